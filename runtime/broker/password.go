package broker

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/bcrypt"
)

// DefaultBcryptCost is the bcrypt cost HashPassword uses: about 50 ms per
// verification on a current core, a few hundred ms on a small ARM board.
const DefaultBcryptCost = 10

// MaxBcryptCost is the highest bcrypt cost CheckHash accepts: each step
// doubles the work, and cost 14 already takes about a second per check on a
// small board; a higher one would make every login, and every failed guess,
// take minutes.
const MaxBcryptCost = 14

// Limits on argon2id parameters that a hash may ask for: every failed login
// costs the broker this much memory and time, and verifications run a few
// at a time.
const (
	maxArgonMemoryKiB = 64 << 10
	maxArgonTime      = 10
	maxArgonThreads   = 16
)

// HashPassword returns the bcrypt hash of password, as the broker's users
// take it ($2a$...). cost 0 means DefaultBcryptCost; a cost above
// MaxBcryptCost is an error. It is safe for concurrent use.
func HashPassword(password []byte, cost int) (string, error) {
	if len(password) == 0 {
		return "", errors.New("broker: empty password")
	}
	if len(password) > 72 {
		return "", errors.New("broker: password longer than 72 bytes (bcrypt's limit)")
	}
	if cost == 0 {
		cost = DefaultBcryptCost
	}
	if cost > MaxBcryptCost {
		return "", fmt.Errorf("broker: bcrypt cost %d is above the maximum %d", cost, MaxBcryptCost)
	}
	h, err := bcrypt.GenerateFromPassword(password, cost)
	if err != nil {
		return "", fmt.Errorf("broker: hash password: %w", err)
	}
	return string(h), nil
}

// HashPasswordArgon2id returns an argon2id hash of password as a PHC
// string ($argon2id$v=19$m=65536,t=3,p=2$salt$key), with the RFC 9106
// second recommended parameters scaled to an edge device: 64 MiB, 3
// passes, 2 lanes.
func HashPasswordArgon2id(password []byte) (string, error) {
	if len(password) == 0 {
		return "", errors.New("broker: empty password")
	}
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return "", fmt.Errorf("broker: salt: %w", err)
	}
	const m, t, p = 64 << 10, 3, 2
	key := argon2.IDKey(password, salt, t, m, p, 32)
	b64 := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, m, t, p,
		b64.EncodeToString(salt), b64.EncodeToString(key)), nil
}

// CheckHash reports whether hash is a password hash the broker verifies:
// bcrypt ($2a$, $2b$, $2y$) of cost at most MaxBcryptCost or argon2id in PHC form with at most 64 MiB, 10
// passes and 16 lanes.
func CheckHash(hash string) error {
	switch {
	case strings.HasPrefix(hash, "$2a$"), strings.HasPrefix(hash, "$2b$"), strings.HasPrefix(hash, "$2y$"):
		cost, err := bcrypt.Cost([]byte(hash))
		if err != nil {
			return fmt.Errorf("broker: bcrypt hash: %w", err)
		}
		if cost > MaxBcryptCost {
			return fmt.Errorf("broker: bcrypt hash: cost %d is above the maximum %d (make one with 'outpost passwd')", cost, MaxBcryptCost)
		}
		return nil
	case strings.HasPrefix(hash, "$argon2id$"):
		_, err := parseArgon2id(hash)
		return err
	case hash == "":
		return errors.New("broker: empty password hash")
	}
	return errors.New("broker: password hash is neither bcrypt ($2a$, $2b$, $2y$) nor argon2id ($argon2id$): make one with 'outpost passwd'")
}

type argonHash struct {
	m      uint32
	t      uint32
	p      uint8
	salt   []byte
	key    []byte
	hashed string
}

func parseArgon2id(hash string) (*argonHash, error) {
	// "", "argon2id", "v=19", "m=...,t=...,p=...", salt, key
	parts := strings.Split(hash, "$")
	if len(parts) != 6 || parts[1] != "argon2id" {
		return nil, errors.New("broker: argon2id hash: want $argon2id$v=19$m=M,t=T,p=P$SALT$KEY")
	}
	var v int
	if _, err := fmt.Sscanf(parts[2], "v=%d", &v); err != nil || v != argon2.Version {
		return nil, fmt.Errorf("broker: argon2id hash: version %q, want v=%d", parts[2], argon2.Version)
	}
	h := &argonHash{hashed: hash}
	var p uint32
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &h.m, &h.t, &p); err != nil {
		return nil, fmt.Errorf("broker: argon2id hash: parameters %q: %w", parts[3], err)
	}
	if h.m < 8 || h.m > maxArgonMemoryKiB || h.t < 1 || h.t > maxArgonTime || p < 1 || p > maxArgonThreads {
		return nil, fmt.Errorf("broker: argon2id hash: parameters %q out of range (m 8 to %d KiB, t 1 to %d, p 1 to %d)",
			parts[3], maxArgonMemoryKiB, maxArgonTime, maxArgonThreads)
	}
	h.p = uint8(p)
	var err error
	if h.salt, err = base64.RawStdEncoding.DecodeString(parts[4]); err != nil || len(h.salt) < 8 {
		return nil, errors.New("broker: argon2id hash: salt is not unpadded base64 of at least 8 bytes")
	}
	if h.key, err = base64.RawStdEncoding.DecodeString(parts[5]); err != nil || len(h.key) < 16 {
		return nil, errors.New("broker: argon2id hash: key is not unpadded base64 of at least 16 bytes")
	}
	return h, nil
}

// verifyPassword reports whether password matches hash; an unsupported
// hash matches nothing.
func verifyPassword(hash string, password []byte) bool {
	if strings.HasPrefix(hash, "$argon2id$") {
		h, err := parseArgon2id(hash)
		if err != nil {
			return false
		}
		key := argon2.IDKey(password, h.salt, h.t, h.m, h.p, uint32(len(h.key)))
		return subtle.ConstantTimeCompare(key, h.key) == 1
	}
	return bcrypt.CompareHashAndPassword([]byte(hash), password) == nil
}
