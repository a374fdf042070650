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

// HTTPGet downloads url into the blob named blob (capability "http") and
// returns its size. The host checks the URL's host against the manifest's
// http_hosts (abi.ErrDenied) and bounds the size (abi.ErrLimit); a 4xx
// answer is abi.ErrNotFound, a server out of reach or a 5xx
// abi.ErrUnavailable.
func HTTPGet(url, blob string) (int64, error) { return httpGetHost(url, blob) }

// BlobSize returns the size of a staged blob (capability "blob"); a
// missing one is abi.ErrNotFound.
func BlobSize(name string) (int64, error) { return blobSizeHost(name) }

// BlobRead reads from a blob at off into p and returns the number of bytes
// read, 0 at or past the end.
func BlobRead(name string, p []byte, off int64) (int, error) { return blobReadHost(name, p, off) }

// BlobDelete deletes a blob; a missing one is not an error.
func BlobDelete(name string) error { return blobDeleteHost(name) }

// Progress reports the progress of the device-management action being
// served (capability "dm"): percent 0 to 100 and a short message.
func Progress(percent int, msg string) error { return progressHost(percent, msg) }

// TwinGet returns the device's state as the hub sees it, as JSON
// (capability "twin"): the cached twin on Azure, the device-management
// attributes on Watson. It works while the hub is out of reach.
func TwinGet() ([]byte, error) { return twinGetHost() }

// TwinReport queues a reported patch (a JSON merge patch) for the hub.
func TwinReport(patch []byte) error { return twinReportHost(patch) }
