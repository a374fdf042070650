;; Exports outpost_handle with the wrong signature.
(module
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32) (result i64)
    (i64.const 200)))
