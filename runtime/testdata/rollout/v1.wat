;; Version 1.0.0 of the plugin "versioned" (remote rollout tests): every
;; call answers 200 with its version.
(module
  (import "outpost_v1" "resp_write" (func $resp_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "1.0.0")
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (drop (call $resp_write (i32.const 0) (i32.const 5)))
    (i32.const 200)))
