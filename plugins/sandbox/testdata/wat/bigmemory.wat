;; Declares more memory (32 MiB) than the default limit allows.
(module
  (memory (export "memory") 512)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (i32.const 200)))
