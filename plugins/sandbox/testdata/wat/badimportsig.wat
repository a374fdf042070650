;; Imports req_meta with the wrong signature.
(module
  (import "outpost_v1" "req_meta" (func (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (i32.const 200)))
