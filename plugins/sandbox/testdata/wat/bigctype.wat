;; Sets a content type longer than an MQTT string may be (70,000 bytes);
;; answers 400 if the host refuses it with E_BADARG (-3).
(module
  (import "outpost_v1" "resp_set_content_type" (func $set_ct (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "outpost_abi_v1"))
  (func (export "outpost_handle") (param i32 i32) (result i32)
    (if (result i32) (i32.eq (call $set_ct (i32.const 0) (i32.const 70000)) (i32.const -3))
      (then (i32.const 400))
      (else (i32.const 200)))))
