;; A version of "versioned" that refuses to start: outpost_init returns 1.
(module
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_init") (param i32) (result i32) (i32.const 1))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (i32.const 200)))
