;; Has the marker but not outpost_handle.
(module
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1")))
