;; fuel_hog: a finite but long computation (2^40 iterations); any sane fuel budget runs out.
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "run") (param $ptr i32) (param $len i32) (result i64)
    (local $n i64) (local $acc i64)
    (local.set $n (i64.const 1099511627776))
    (loop $l
      (local.set $acc (i64.add (local.get $acc) (local.get $n)))
      (local.set $n (i64.sub (local.get $n) (i64.const 1)))
      (br_if $l (i64.ne (local.get $n) (i64.const 0))))
    (i64.store (i32.const 0) (local.get $acc))
    (i64.const 8)))
