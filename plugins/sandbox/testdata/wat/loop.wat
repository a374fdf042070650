;; Never returns.
(module
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (loop $forever (br $forever))
    (i32.const 200)))
