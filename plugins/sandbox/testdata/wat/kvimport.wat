;; Imports the key/value capability, which it was not granted.
(module
  (import "outpost_kv_v1" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (i32.const 200)))
