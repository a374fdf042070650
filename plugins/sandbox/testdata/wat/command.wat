;; A WASI command: exports _start, not _initialize.
(module
  (memory (export "memory") 1)
  (func (export "_start"))
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (i32.const 200)))
