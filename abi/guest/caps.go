package guest

// KVGet returns the value stored under key in the plugin's key/value
// namespace (capability "kv"). A missing key is abi.ErrNotFound.
func KVGet(key string) ([]byte, error) { return kvGetHost(key) }

// KVSet stores value under key. Over the plugin's quota it is abi.ErrLimit.
func KVSet(key string, value []byte) error { return kvSetHost(key, value) }

// KVDelete deletes key; a missing key is not an error.
func KVDelete(key string) error { return kvDeleteHost(key) }

// Publish publishes to the local broker (capability "publish"), qos 0 or
// 1. A topic outside the manifest's publish_topics is abi.ErrDenied.
func Publish(topic string, payload []byte, qos int) error { return publishHost(topic, payload, qos) }
