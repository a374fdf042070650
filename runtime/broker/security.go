package broker

import (
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// user is a User ready to check.
type user struct {
	name  string
	hash  string
	rules *aclRules // the user's own rules and Options.UserACL
}

// v3Refusal maps the MQTT 5 CONNACK reasons the hook refuses with to MQTT
// 3.1.1 return codes.
var v3Refusal = map[byte]byte{
	packets.ErrClientIdentifierNotValid.Code: 0x02, // identifier rejected
	packets.ErrBadUsernameOrPassword.Code:    0x04, // bad user name or password
	packets.ErrConnectionRateExceeded.Code:   0x03, // server unavailable
	packets.ErrNotAuthorized.Code:            0x05, // not authorized
	packets.ErrServerBusy.Code:               0x03, // server unavailable
}

// creds are the users and the ACLs, compiled; SetUsers replaces them whole.
type creds struct {
	users     map[string]*user
	decoys    []string  // the users' hashes, sorted: see decoyHash
	userRules *aclRules // Options.UserACL, with no user's own rules
	anonRules *aclRules // nil = anonymous clients may do anything
}

// compileCreds checks and compiles the users and the ACLs.
func compileCreds(users []User, userACL ACL, anonymousACL *ACL) (*creds, error) {
	var errs []error
	var err error
	c := &creds{users: map[string]*user{}}
	if c.userRules, err = compileACL(userACL); err != nil {
		errs = append(errs, fmt.Errorf("user ACL: %w", err))
	}
	if anonymousACL != nil {
		if c.anonRules, err = compileACL(*anonymousACL); err != nil {
			errs = append(errs, fmt.Errorf("anonymous ACL: %w", err))
		}
	}
	for _, u := range users {
		switch {
		case u.Username == "" || strings.ContainsAny(u.Username, "/+#"):
			errs = append(errs, fmt.Errorf("user %q: a username is not empty and has no '/', '+', '#'", u.Username))
			continue
		case c.users[u.Username] != nil:
			errs = append(errs, fmt.Errorf("user %q: defined twice", u.Username))
			continue
		}
		if err := CheckHash(u.PasswordHash); err != nil {
			errs = append(errs, fmt.Errorf("user %q: %w", u.Username, err))
		}
		rules, err := compileACL(u.ACL, userACL)
		if err != nil {
			errs = append(errs, fmt.Errorf("user %q: %w", u.Username, err))
		}
		c.users[u.Username] = &user{name: u.Username, hash: u.PasswordHash, rules: rules}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	for _, u := range c.users {
		c.decoys = append(c.decoys, u.hash)
	}
	slices.Sort(c.decoys)
	return c, nil
}

// SetUsers replaces the users and the ACLs while the broker runs. The
// ACLs apply from the next check (a delivery included). A connected
// client that logged in with a username keeps its connection only if its
// user is still there with the same password hash: the others (a user
// removed, a password changed, or credentials that no user checked
// because there were none) are disconnected, to log in again under the
// new users. It returns how many were.
func (b *Broker) SetUsers(users []User, userACL ACL, anonymousACL *ACL) (int, error) {
	c, err := compileCreds(users, userACL, anonymousACL)
	if err != nil {
		return 0, err
	}
	h := b.hook
	old := h.creds.Swap(c)
	cut := 0
	for _, cl := range b.srv.Clients.GetAll() {
		name := string(cl.Properties.Username)
		if cl.Net.Inline || cl.Closed() || name == "" {
			continue
		}
		before, after := old.users[name], c.users[name]
		if before != nil && after != nil && before.hash == after.hash {
			continue
		}
		cut++
		h.log.Warn("disconnected a client: its user was removed or its password changed", "client", cl.ID, "username", name)
		if cl.Properties.ProtocolVersion == 5 {
			_ = cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect},
				ReasonCode: packets.ErrNotAuthorized.Code})
		}
		cl.Stop(packets.ErrNotAuthorized)
	}
	h.log.Info("broker users and ACLs replaced", "users", len(c.users), "disconnected", cut)
	return cut, nil
}

// decoyHash is the hash verified for an unknown username, so that its
// refusal takes as long as a known user's: one of the users' own hashes,
// the same for the same name, so that its algorithm and cost are ones the
// configured users have (a fixed dummy hash of one cost would tell users
// with other costs or argon2id from unknown names).
func (h *ingestHook) decoyHash(name string) string {
	f := fnv.New32a()
	f.Write([]byte(name))
	decoys := h.creds.Load().decoys
	return decoys[f.Sum32()%uint32(len(decoys))]
}

// userOf returns the user a client logged in as, or nil for an anonymous
// client. A client that sent a username was refused unless it is a user's
// (or there are no users, and then it is anonymous).
func (h *ingestHook) userOf(cl *mqtt.Client) *user {
	if len(cl.Properties.Username) == 0 {
		return nil
	}
	return h.creds.Load().users[string(cl.Properties.Username)]
}

// OnConnectAuthenticate admits a client with a user's right password, or an
// anonymous client on a listener that allows them. A client that sends
// credentials must match a user, on any listener, unless there are no
// users. Failed logins lock the remote address out for a while (AuthBackoff).
// A client may not take over the client id of another user's connected
// client; a disconnected session of another user's is discarded.
func (h *ingestHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	if cl.Net.Inline {
		return true
	}
	c := &pk.Connect
	switch {
	case len(h.creds.Load().users) > 0 && (c.UsernameFlag || c.PasswordFlag):
		if !h.login(cl, pk) {
			return false
		}
	case !h.anonymous[cl.Net.Listener]:
		h.anonRefused.Add(1)
		h.log.Warn("refused anonymous client: the listener is not on loopback and allow_anonymous is off",
			"client", cl.ID, "remote", cl.Net.Remote, "listener", cl.Net.Listener)
		// mochi's answer, as before users existed: 0x86, MQTT 3.1.1 0x05.
		return false
	}
	old, ok := h.srv.Clients.Get(cl.ID)
	foreign := ok && (old.Net.Inline || h.userOf(old) != h.userOf(cl))
	if foreign && (old.Net.Inline || !old.Closed()) {
		h.log.Warn("refused a client whose id is another user's connected client",
			"client", cl.ID, "username", string(cl.Properties.Username), "remote", cl.Net.Remote)
		return h.refuseConnect(cl, packets.ErrClientIdentifierNotValid)
	}
	if c.WillFlag && !h.willAllowed(cl, c.WillTopic) {
		h.warnACL(cl, "will", c.WillTopic)
		return h.refuseConnect(cl, packets.ErrNotAuthorized)
	}
	if foreign {
		h.discardSession(old, cl)
	}
	return true
}

// discardSession deletes the session that a disconnected client of
// another identity left under cl's client id, so that cl starts clean
// instead of inheriting its subscriptions and queued messages (mochi's
// inheritClientSession would), and the id cannot be squatted by leaving a
// session behind.
func (h *ingestHook) discardSession(old, cl *mqtt.Client) {
	h.srv.UnsubscribeClient(old)
	old.ClearInflights()
	if cur, ok := h.srv.Clients.Get(old.ID); ok && cur == old {
		h.srv.Clients.Delete(old.ID)
	}
	h.log.Info("discarded another user's disconnected session for a client id it now logs in with",
		"client", cl.ID, "username", string(cl.Properties.Username), "old_username", string(old.Properties.Username),
		"remote", cl.Net.Remote)
}

// willAllowed reports whether cl may leave a will on topic. mochi delivers
// and retains a will without OnACLCheck or OnPublish, so the will is
// checked here, once the identity is known: the client must be allowed to
// publish to the topic, and it may be neither one of the agent's request
// topics (a will is not served) nor a '$' topic.
func (h *ingestHook) willAllowed(cl *mqtt.Client, topic string) bool {
	return h.allowed(cl, topic, true) && !h.isRequest(topic) && !strings.HasPrefix(topic, "$")
}

// login checks a client's username and password. At most
// maxAttemptsPerRemote logins from one address are checked at once, and the
// lockout is checked again once a check may start, so that parallel guesses
// cost no more checks than sequential ones.
func (h *ingestHook) login(cl *mqtt.Client, pk packets.Packet) bool {
	ip := remoteIP(cl.Net.Remote)
	name := string(pk.Connect.Username)
	if h.guard.locked(ip) {
		return h.refuseLocked(cl, name, "too many failed logins")
	}
	if !h.guard.begin(ip) {
		return h.refuseLocked(cl, name, "too many logins in progress from the address")
	}
	u := h.creds.Load().users[name]
	hash := h.decoyHash(name) // refused below whatever it verifies
	if u != nil {
		hash = u.hash
	}
	release, ok := h.verifySlot(hash)
	if !ok {
		h.guard.end(ip)
		h.busy.Add(1)
		h.log.Warn("refused a login: no password check could start in time (too many logins at once)",
			"username", name, "client", cl.ID, "remote", cl.Net.Remote, "wait", verifyWait)
		return h.refuseConnect(cl, packets.ErrServerBusy)
	}
	if h.guard.locked(ip) {
		release()
		h.guard.end(ip)
		return h.refuseLocked(cl, name, "too many failed logins")
	}
	h.checks.Add(1)
	ok = verifyPassword(hash, pk.Connect.Password) && u != nil && pk.Connect.PasswordFlag
	if cur := h.creds.Load().users[name]; ok && (cur == nil || cur.hash != hash) {
		ok = false // SetUsers removed the user or changed its password during the check
	}
	release()
	h.guard.end(ip)
	if ok {
		h.guard.succeed(ip)
		return true
	}
	h.authFailures.Add(1)
	delay := h.guard.fail(ip)
	h.log.Warn("refused a login: bad username or password",
		"username", name, "known_user", u != nil, "client", cl.ID, "remote", cl.Net.Remote, "delay", delay)
	h.sleep(delay, h.done)
	return h.refuseConnect(cl, packets.ErrBadUsernameOrPassword)
}

// refuseLocked refuses a login from a locked-out address, or one with too
// many logins in progress, without checking its password.
func (h *ingestHook) refuseLocked(cl *mqtt.Client, name, why string) bool {
	h.authLocked.Add(1)
	h.log.Warn("refused a login from a locked-out address: "+why,
		"username", name, "client", cl.ID, "remote", cl.Net.Remote)
	return h.refuseConnect(cl, packets.ErrConnectionRateExceeded)
}

// verifySlot waits, at most verifyWait, until a password check of hash may
// start, and returns the function that ends it; false when none could
// start in time or the broker is closing. argon2id checks, which take up to
// 64 MiB each, also take one of fewer argon2id slots.
func (h *ingestHook) verifySlot(hash string) (release func(), ok bool) {
	t := time.NewTimer(h.verifyWait)
	defer t.Stop()
	argon := strings.HasPrefix(hash, "$argon2id$")
	if argon {
		select {
		case h.argonSlots <- struct{}{}:
		case <-t.C:
			return nil, false
		case <-h.done:
			return nil, false
		}
	}
	select {
	case h.verifying <- struct{}{}:
		return func() {
			<-h.verifying
			if argon {
				<-h.argonSlots
			}
		}, true
	case <-t.C:
	case <-h.done:
	}
	if argon {
		<-h.argonSlots
	}
	return nil, false
}

// refuseConnect makes the client's CONNACK carry code (see OnPacketEncode)
// and returns false.
func (h *ingestHook) refuseConnect(cl *mqtt.Client, code packets.Code) bool {
	h.refusals.Store(cl, code)
	return false
}

// OnACLCheck applies the ACLs: write is a publish to topic; otherwise topic
// is a subscription's filter or the topic of a message to deliver.
// mochi checks a publish before it resolves an MQTT 5 topic alias, so a
// publish that reuses an alias comes with an empty topic: it is let
// through here and its resolved topic checked in OnPublish.
func (h *ingestHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if write && topic == "" && cl.Properties.ProtocolVersion == 5 {
		return true
	}
	if h.allowed(cl, topic, write) {
		return true
	}
	what := "subscribe or receive"
	if write {
		what = "publish"
	}
	h.warnACL(cl, what, topic)
	return false
}

// allowed reports whether the ACLs let cl publish to topic (write) or
// subscribe to it or receive it.
func (h *ingestHook) allowed(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	rules, name := h.creds.Load().anonRules, ""
	if u := h.userOf(cl); u != nil {
		rules, name = u.rules, u.name
	}
	if write {
		return rules.allowPublish(name, cl.ID, topic)
	}
	return rules.allowSubscribe(name, cl.ID, topic)
}

// warnACL counts a refusal and logs it at most once every 10s.
func (h *ingestHook) warnACL(cl *mqtt.Client, what, topic string) {
	h.aclDenied.Add(1)
	if every(&h.lastACLWarn, 10*time.Second) {
		h.log.Warn("ACL refused (logged once per 10s)", "action", what, "topic", topic, "client", cl.ID,
			"username", string(cl.Properties.Username), "acl_denied_total", h.aclDenied.Load())
	}
}

// takeToken takes one publish from the client's rate limit.
func (h *ingestHook) takeToken(cl *mqtt.Client) bool {
	b, ok := h.buckets.Load(cl)
	if !ok {
		b, _ = h.buckets.LoadOrStore(cl, newBucket(h.rate, h.now()))
	}
	if b.(*bucket).take(h.now()) {
		return true
	}
	h.rateLimited.Add(1)
	if every(&h.lastRateWarn, 10*time.Second) {
		h.log.Warn("client publishes over broker.rate_limit (logged once per 10s)", "client", cl.ID,
			"remote", cl.Net.Remote, "rate_limited_total", h.rateLimited.Load())
	}
	return false
}

// refuse answers a publish the broker will not take: a QoS 0 publish is
// dropped; MQTT 5 QoS 1 gets a PUBACK with code; MQTT 5 QoS 2 gets a
// DISCONNECT with code (mochi would answer it with a PUBACK, a protocol
// error); an MQTT 3.1.1 client, which has no reason codes, is disconnected.
func (h *ingestHook) refuse(cl *mqtt.Client, pk packets.Packet, code packets.Code) (packets.Packet, error) {
	switch {
	case pk.FixedHeader.Qos == 0:
		return pk, packets.ErrRejectPacket
	case cl.Properties.ProtocolVersion == 5 && pk.FixedHeader.Qos == 1:
		return pk, code
	case cl.Properties.ProtocolVersion == 5:
		_ = h.srv.DisconnectClient(cl, code)
	default:
		cl.Stop(code)
	}
	return pk, packets.ErrRejectPacket
}
