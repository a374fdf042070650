;; A version of "versioned" that lacks the required export outpost_handle.
(module
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1")))
