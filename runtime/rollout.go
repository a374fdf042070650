package runtime

import (
	"context"

	"github.com/outpost-edge/outpost/plugins"
	"github.com/outpost-edge/outpost/plugins/sandbox"
	"github.com/outpost-edge/outpost/runtime/dialect/azure"
	"github.com/outpost-edge/outpost/runtime/dialect/watson"
	"github.com/outpost-edge/outpost/runtime/dispatch"
	"github.com/outpost-edge/outpost/runtime/rollout"
)

// requestServer serves the hub's requests: the dispatcher, behind the
// remote plugin rollout when plugins.rollout.enabled (the host serves the
// rollout's methods and DM actions itself). The Watson identity, when set,
// is the one whose rollout actions are served.
func (a *Agent) requestServer(watsonType, watsonID string) (interface {
	Serve(dispatch.Call, func(*sandbox.Response))
}, error) {
	r := a.cfg.Plugins.Rollout
	if !r.Enabled {
		return a.dispatch, nil
	}
	if a.rollout == nil {
		ro, err := rollout.New(rollout.Options{Registry: a.plugins, Next: a.dispatch, Hosts: plugins.HostList(r.Hosts),
			MaxBytes: int64(r.MaxBytes), DeviceType: watsonType, DeviceID: watsonID,
			Log: a.log})
		if err != nil {
			return nil, err
		}
		a.rollout = ro
	}
	return a.rollout, nil
}

// rolloutBundles are the Watson custom action bundles the gateway serves
// for itself only: the rollout's, when it is enabled.
func (a *Agent) rolloutBundles() []string {
	if !a.cfg.Plugins.Rollout.Enabled {
		return nil
	}
	return []string{rollout.Bundle}
}

// closeRollout ends the rollout operations in progress, before the
// plugins close.
func (a *Agent) closeRollout(ctx context.Context) {
	if a.rollout != nil {
		a.rollout.Close(ctx)
	}
}

// reservedHandlers are the methods the agent serves itself, which no
// plugin may claim: a plugin serving them would answer local callers
// while the hub's calls never reach it.
var reservedHandlers = []plugins.HandlerSpec{
	{Kind: "method", Name: azure.MethodFirmwareUpdate},
	{Kind: "method", Name: rollout.MethodInstall}, {Kind: "method", Name: rollout.MethodRollback},
	{Kind: "method", Name: rollout.MethodRemove}, {Kind: "method", Name: rollout.MethodList},
	{Kind: "dm_action", Name: watson.CustomAction(rollout.Bundle, rollout.ActionInstall)},
	{Kind: "dm_action", Name: watson.CustomAction(rollout.Bundle, rollout.ActionRollback)},
	{Kind: "dm_action", Name: watson.CustomAction(rollout.Bundle, rollout.ActionRemove)},
	{Kind: "dm_action", Name: watson.CustomAction(rollout.Bundle, rollout.ActionList)},
}
