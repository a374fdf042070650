;; Grows its table by 2^26 elements (512 MiB of host memory) on every call:
;; answers 200 if the table grew, 413 if the grow was refused.
(module
  (memory (export "memory") 1)
  (table 1 funcref)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (if (i32.eq (table.grow 0 (ref.null func) (i32.const 0x4000000)) (i32.const -1))
      (then (return (i32.const 413))))
    (i32.const 200)))
