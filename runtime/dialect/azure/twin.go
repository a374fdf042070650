package azure

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/outpost-edge/outpost/runtime/twin"
	"github.com/outpost-edge/outpost/runtime/uplink"
)

// poke wakes the twin loop.
func (d *Dialect) poke() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// request sends a request (QoS 0, with fresh Correlation Data) and waits
// for its response on $iothub/responses. A response with a status is an
// *Error.
func (d *Dialect) request(ctx context.Context, op string, o uplink.Outbound) (*uplink.Inbound, error) {
	d.mu.Lock()
	l := d.link
	d.mu.Unlock()
	if l == nil {
		return nil, uplink.ErrLost
	}
	d.reqMu.Lock()
	d.corrSeq++
	corr := make([]byte, 16) // at most MaxCorrelation
	copy(corr, d.corrBase[:])
	binary.BigEndian.PutUint64(corr[8:], d.corrSeq)
	ch := make(chan *uplink.Inbound, 1)
	d.requests[string(corr)] = ch
	d.reqMu.Unlock()
	defer func() {
		d.reqMu.Lock()
		delete(d.requests, string(corr))
		d.reqMu.Unlock()
	}()
	o.CorrelationData = corr
	if err := l.Send(ctx, o); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, d.o.RequestTimeout)
	defer cancel()
	select {
	case m := <-ch:
		if m == nil {
			return nil, uplink.ErrLost // the connection went down meanwhile
		}
		if s := m.Prop(PropStatus); s != "" {
			st, err := ParseStatus(s)
			if err != nil {
				return nil, fmt.Errorf("azure: %s: the hub answered a status that is not one: %q", op, s)
			}
			if st.Class() != ClassSuccess {
				return nil, &Error{Op: op, Status: st, Reason: m.Prop(PropReason), TraceID: m.Prop(PropTraceID)}
			}
		}
		return m, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("azure: %s: no response from the hub: %w", op, ctx.Err())
	}
}

// response hands a response to the request that waits for it.
func (d *Dialect) response(m *uplink.Inbound) {
	_ = m.Ack(0)
	d.reqMu.Lock()
	ch, ok := d.requests[string(m.CorrelationData)]
	d.reqMu.Unlock()
	if !ok {
		d.log.Debug("response for no request waiting (late, or from an earlier process): dropped", "correlation", fmt.Sprintf("%x", m.CorrelationData))
		return
	}
	select {
	case ch <- m:
	default:
	}
}

// desired applies a desired patch in version order; a gap in the versions
// makes the twin loop read the whole twin.
func (d *Dialect) desired(m *uplink.Inbound) {
	_ = m.Ack(0)
	if d.o.Twin == nil {
		return
	}
	v, err := strconv.ParseInt(m.Prop(PropVersion), 10, 64)
	if err != nil || v < 1 {
		d.log.Warn("desired patch without a valid version: reading the whole twin instead", "version", m.Prop(PropVersion))
		d.getWhole()
		return
	}
	res, err := d.o.Twin.ApplyDesired(m.Payload, v)
	switch {
	case err != nil:
		d.log.Warn("desired patch not applied: reading the whole twin instead", "version", v, "error", err)
		d.getWhole()
	case res == twin.Gap:
		d.log.Info("desired patch after a gap in versions: reading the whole twin", "version", v)
		d.getWhole()
	case res == twin.Applied:
		d.log.Info("desired properties patched", "version", v)
	}
}

func (d *Dialect) getWhole() {
	d.reqMu.Lock()
	d.needGet = true
	d.getAsked++
	d.reqMu.Unlock()
	d.poke()
}

// twinLoop brings the twin in line with the hub while connected: reads it
// whole when asked, then sends the queued reported patches one at a time,
// in order, each with if-version. A precondition failure reads the twin
// again and retries; a throttled or failing hub is retried after a delay
// that grows; a patch the hub refuses as bad is dropped, loudly.
func (d *Dialect) twinLoop() {
	defer d.wg.Done()
	var delay time.Duration
	changed := d.o.Twin.Watch()
	for {
		if delay > 0 {
			// After a failure nothing hurries the retry: not a wake-up, not
			// a new patch.
			select {
			case <-d.ctx.Done():
				return
			case <-time.After(delay):
			}
		} else {
			select {
			case <-d.ctx.Done():
				return
			case <-d.wake:
			case <-changed:
				changed = d.o.Twin.Watch()
			}
		}
		ok, err := d.syncTwin()
		switch {
		case err == nil && ok:
			delay = 0
		case err == nil:
			// Not connected: the next OnConnect wakes the loop.
		default:
			delay = min(max(delay*2, time.Second), 2*time.Minute)
			var e *Error
			if errors.As(err, &e) && e.Status.Action() == BackOff {
				delay = max(delay, 10*time.Second)
			}
			d.log.Warn("twin not in line with the hub; retrying", "error", err, "in", delay)
		}
	}
}

// syncTwin does what the twin needs now. ok is false when not connected.
func (d *Dialect) syncTwin() (ok bool, err error) {
	d.reqMu.Lock()
	up, get := d.up, d.needGet
	d.reqMu.Unlock()
	if !up {
		return false, nil
	}
	ctx := d.ctx
	if get {
		if err := d.readTwin(ctx); err != nil {
			return d.failed(err)
		}
	}
	for _, p := range d.o.Twin.Pending() {
		props := []uplink.Property(nil)
		if v := d.o.Twin.Reported().Version; v > 0 {
			props = append(props, uplink.Property{Key: PropIfVersion, Value: strconv.FormatInt(v, 10)})
		}
		m, err := d.request(ctx, "patch reported", uplink.Outbound{Topic: TopicTwinReported, Payload: p.Patch, UserProps: props})
		var e *Error
		switch {
		case err == nil:
			v, perr := strconv.ParseInt(m.Prop(PropVersion), 10, 64)
			if perr != nil {
				d.log.Warn("reported patch acknowledged without a valid version", "version", m.Prop(PropVersion))
			}
			if err := d.o.Twin.Acked(p.Seq, v); err != nil {
				return true, err
			}
			d.log.Info("reported properties patched", "version", v)
		case errors.As(err, &e) && e.Status == StatusPreconditionFailed:
			d.log.Info("reported patch refused on if-version: reading the twin again", "if_version", props)
			d.getWhole()
			return true, err
		case errors.As(err, &e) && e.Status.Action() == Fail:
			d.log.Error("hub refused a reported patch: dropped", "error", err, "patch", string(p.Patch))
			if err := d.o.Twin.Drop(p.Seq); err != nil {
				return true, err
			}
		default:
			return d.failed(err)
		}
	}
	return true, nil
}

// failed turns a request's error into syncTwin's result, re-authenticating
// when the hub says Not Authorized.
func (d *Dialect) failed(err error) (bool, error) {
	if errors.Is(err, uplink.ErrLost) {
		return false, nil
	}
	var e *Error
	if errors.As(err, &e) && e.Status.Action() == Reauth {
		d.reauthenticate()
	}
	return true, err
}

// readTwin reads the whole twin and replaces the cached one.
func (d *Dialect) readTwin(ctx context.Context) error {
	d.reqMu.Lock()
	asked := d.getAsked
	d.reqMu.Unlock()
	m, err := d.request(ctx, "get twin", uplink.Outbound{Topic: TopicTwinGet})
	if err != nil {
		return err
	}
	des, rep, err := twin.ParseDoc(m.Payload)
	if err != nil {
		return fmt.Errorf("azure: get twin: %w", err)
	}
	if err := d.o.Twin.SetFull(des, rep); err != nil {
		return err
	}
	d.reqMu.Lock()
	if d.getAsked == asked { // no gap found while the read was out
		d.needGet = false
	}
	d.reqMu.Unlock()
	d.log.Info("twin read", "desired_version", des.Version, "reported_version", rep.Version)
	return nil
}
