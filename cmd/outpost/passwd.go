package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"golang.org/x/term"

	"github.com/outpost-edge/outpost/runtime/broker"
)

const passwdUsage = `Usage: outpost passwd [--password-stdin] [--argon2id | --cost N]

Reads a password and prints its hash, for broker.users[].password_hash (or a
users_file). The password is read from standard input when it is not a
terminal or with --password-stdin (up to the first newline), else asked for
twice without echo. It is never taken from the command line, where other
users of the host could read it.

  read -rs PASSWORD; echo "$PASSWORD" | outpost passwd

Flags:
`

// cmdPasswd is 'outpost passwd'.
func cmdPasswd(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("outpost passwd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fromStdin := fs.Bool("password-stdin", false, "read the password from standard input even when it is a terminal")
	useArgon := fs.Bool("argon2id", false, "hash with argon2id (64 MiB, 3 passes) instead of bcrypt")
	cost := fs.Int("cost", broker.DefaultBcryptCost, fmt.Sprintf("bcrypt `cost` (4 to %d; each step doubles the work)", broker.MaxBcryptCost))
	fs.Usage = func() {
		fmt.Fprint(stderr, passwdUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintln(stderr, "outpost passwd: the password is read from standard input, never taken from the command line")
		return 2
	}
	pw, err := readPassword(stdin, stderr, *fromStdin)
	if err != nil {
		fmt.Fprintln(stderr, "outpost passwd:", err)
		return 1
	}
	var hash string
	if *useArgon {
		hash, err = broker.HashPasswordArgon2id(pw)
	} else {
		hash, err = broker.HashPassword(pw, *cost)
	}
	if err != nil {
		fmt.Fprintln(stderr, "outpost passwd:", err)
		return 1
	}
	fmt.Fprintln(stdout, hash)
	return 0
}

// readPassword reads the password: one line of stdin, or asked twice on
// the terminal without echo.
func readPassword(stdin io.Reader, stderr io.Writer, fromStdin bool) ([]byte, error) {
	f, isFile := stdin.(*os.File)
	if fromStdin || !isFile || !term.IsTerminal(int(f.Fd())) {
		line, err := bufio.NewReader(stdin).ReadBytes('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("read password: %w", err)
		}
		line = bytes.TrimSuffix(bytes.TrimSuffix(line, []byte("\n")), []byte("\r"))
		if len(line) == 0 {
			return nil, errors.New("empty password on standard input")
		}
		return line, nil
	}
	fmt.Fprint(stderr, "Password: ")
	pw, err := term.ReadPassword(int(f.Fd()))
	fmt.Fprintln(stderr)
	if err != nil {
		return nil, fmt.Errorf("read password: %w", err)
	}
	fmt.Fprint(stderr, "Again: ")
	again, err := term.ReadPassword(int(f.Fd()))
	fmt.Fprintln(stderr)
	if err != nil {
		return nil, fmt.Errorf("read password: %w", err)
	}
	if !bytes.Equal(pw, again) {
		return nil, errors.New("the passwords differ")
	}
	if len(pw) == 0 {
		return nil, errors.New("empty password")
	}
	return pw, nil
}
