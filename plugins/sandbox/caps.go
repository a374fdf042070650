package sandbox

import (
	"context"
	"errors"

	"github.com/tetratelabs/wazero/api"

	"github.com/outpost-edge/outpost/abi"
)

// KVStore is the key/value namespace a plugin granted "kv" uses. Several
// instances call it at once. Set and Delete get copies they may keep; the
// slice Get returns is copied into the guest.
type KVStore interface {
	Get(key []byte) ([]byte, error)
	Set(key, value []byte) error
	Delete(key []byte) error
}

// Errors a KVStore or a Publisher returns, which the guest sees as the
// ABI's error codes. Other errors are E_INTERNAL.
var (
	ErrNotFound = errors.New("not found")      // E_NOT_FOUND
	ErrLimit    = errors.New("limit exceeded") // E_LIMIT
	ErrDenied   = errors.New("denied")         // E_DENIED
	ErrBadArg   = errors.New("bad argument")   // E_BADARG
)

// Publisher publishes for a plugin granted "publish". Its ctx is the
// call's, valid only until the call returns; topic and payload are copies.
type Publisher func(ctx context.Context, topic string, payload []byte, qos byte) error

func errno(err error) int32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrNotFound):
		return int32(abi.ErrNotFound)
	case errors.Is(err, ErrLimit):
		return int32(abi.ErrLimit)
	case errors.Is(err, ErrDenied):
		return int32(abi.ErrDenied)
	case errors.Is(err, ErrBadArg):
		return int32(abi.ErrBadArg)
	case errors.Is(err, ErrUnavailable):
		return int32(abi.ErrUnavailable)
	}
	return int32(abi.ErrInternal)
}

func (p *Plugin) kvFuncs() []hostFn {
	kv := p.cfg.KV
	return []hostFn{
		{name: abi.FuncKVGet, params: 4, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			k := read(c, m, abi.FuncKVGet, i32(s[0]), i32(s[1]))
			v, err := kv.Get(append([]byte(nil), k...))
			if err != nil {
				p.logCapErr(abi.FuncKVGet, err)
				ret(s, errno(err))
				return
			}
			if buf, limit := i32(s[2]), i32(s[3]); int(limit) >= len(v) {
				copyOut(c, m, abi.FuncKVGet, buf, limit, v)
			}
			ret(s, int32(len(v)))
		}},
		{name: abi.FuncKVSet, params: 4, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			k, v := read(c, m, abi.FuncKVSet, i32(s[0]), i32(s[1])), read(c, m, abi.FuncKVSet, i32(s[2]), i32(s[3]))
			// The sizes are checked before anything is copied.
			if len(k) == 0 || len(k) > abi.MaxKVKey {
				ret(s, int32(abi.ErrBadArg))
				return
			}
			if len(v) > abi.MaxKVValue {
				ret(s, int32(abi.ErrLimit))
				return
			}
			err := kv.Set(append([]byte(nil), k...), append([]byte(nil), v...))
			p.logCapErr(abi.FuncKVSet, err)
			ret(s, errno(err))
		}},
		{name: abi.FuncKVDelete, params: 2, results: 1, fn: func(_ context.Context, c *call, m api.Module, s []uint64) {
			k := append([]byte(nil), read(c, m, abi.FuncKVDelete, i32(s[0]), i32(s[1]))...)
			err := kv.Delete(k)
			p.logCapErr(abi.FuncKVDelete, err)
			ret(s, errno(err))
		}},
	}
}

func (p *Plugin) mqttFuncs() []hostFn {
	return []hostFn{
		{name: abi.FuncPublish, params: 5, results: 1, fn: func(ctx context.Context, c *call, m api.Module, s []uint64) {
			t := read(c, m, abi.FuncPublish, i32(s[0]), i32(s[1]))
			pl := read(c, m, abi.FuncPublish, i32(s[2]), i32(s[3]))
			qos := i32(s[4])
			if qos > 1 || len(t) > abi.MaxString {
				ret(s, int32(abi.ErrBadArg))
				return
			}
			if len(pl) > p.lim.MaxPublish {
				ret(s, int32(abi.ErrLimit))
				return
			}
			if !p.publishes.allow() {
				ret(s, int32(abi.ErrLimit))
				return
			}
			topic, payload := string(t), append([]byte(nil), pl...)
			err := p.cfg.Publish(ctx, topic, payload, byte(qos))
			p.logCapErr(abi.FuncPublish, err)
			ret(s, errno(err))
		}},
	}
}

// logCapErr logs a capability call that failed for a reason other than the
// guest's (a store error), which the guest only sees as E_INTERNAL.
func (p *Plugin) logCapErr(fn string, err error) {
	if err == nil || errno(err) != int32(abi.ErrInternal) {
		return
	}
	p.log.Error("host function failed", "function", fn, "error", err)
}
