;; sum: reads the input as little-endian unsigned 32-bit integers (a trailing partial word is
;; ignored) and returns their sum as one little-endian unsigned 64-bit integer (8 bytes).
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func $alloc (export "alloc") (param $len i32) (result i32)
    (local $ptr i32) (local $end i32)
    (local.set $ptr (global.get $heap))
    ;; keep allocations 8-byte aligned
    (local.set $end (i32.and (i32.add (i32.add (local.get $ptr) (local.get $len)) (i32.const 7))
                             (i32.const -8)))
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq
              (memory.grow (i32.sub (i32.shr_u (i32.add (local.get $end) (i32.const 65535))
                                               (i32.const 16))
                                    (memory.size)))
              (i32.const -1))
          (then unreachable))))
    (global.set $heap (local.get $end))
    (local.get $ptr))
  (func (export "run") (param $ptr i32) (param $len i32) (result i64)
    (local $i i32) (local $end i32) (local $acc i64) (local $out i32)
    (local.set $end (i32.add (local.get $ptr) (i32.and (local.get $len) (i32.const -4))))
    (local.set $i (local.get $ptr))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
        (local.set $acc (i64.add (local.get $acc) (i64.load32_u (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 4)))
        (br $next)))
    (local.set $out (call $alloc (i32.const 8)))
    (i64.store (local.get $out) (local.get $acc))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32)) (i64.const 8))))
