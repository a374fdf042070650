;; Traps on its first call. An instance that served a call before answers
;; 299, which the host must never see: an instance is discarded after any
;; error.
(module
  (memory (export "memory") 1)
  (global $served (mut i32) (i32.const 0))
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (if (global.get $served) (then (return (i32.const 299))))
    (global.set $served (i32.const 1))
    unreachable))
