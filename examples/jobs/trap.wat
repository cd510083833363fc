;; trap: divides by the input length, so an empty input traps (integer division by zero);
;; any other input returns nothing.
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "run") (param $ptr i32) (param $len i32) (result i64)
    (drop (i32.div_u (i32.const 1) (local.get $len)))
    (i64.const 0)))
