;; Grows its memory a page at a time until growing fails, then traps.
(module
  (memory (export "memory") 1)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (loop $grow
      (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable))
