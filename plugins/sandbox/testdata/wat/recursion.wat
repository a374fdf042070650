;; Calls itself until the stack overflows.
(module
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1"))
  (func $down (param $n i32) (result i32)
    (i32.add (call $down (i32.add (local.get $n) (i32.const 1))) (i32.const 1)))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (call $down (i32.const 0))))
