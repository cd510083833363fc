;; bad_output: breaks the ABI by returning an output range outside its memory.
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "run") (param $ptr i32) (param $len i32) (result i64)
    ;; pointer 65000, length 1000: past the end of the single 64 KiB page
    (i64.or (i64.shl (i64.const 65000) (i64.const 32)) (i64.const 1000))))
