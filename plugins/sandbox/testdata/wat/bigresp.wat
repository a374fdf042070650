;; Writes its whole 1 MiB memory as the response, again and again.
(module
  (import "outpost_v1" "resp_write" (func $resp_write (param i32 i32) (result i32)))
  (memory (export "memory") 16)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (drop (call $resp_write (i32.const 0) (i32.const 1048576)))
    (drop (call $resp_write (i32.const 0) (i32.const 1048576)))
    (i32.const 200)))
