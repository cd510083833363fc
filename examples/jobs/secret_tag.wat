;; secret_tag: tags its input with the client's secret 0 (e.g. an API key) without revealing
;; it. Output: 8 lowercase hex digits of FNV-1a-32(secret || input), a toy stand-in for the
;; HMAC a real job would compute to authenticate a request. Traps if it was given no secret 0.
;; Job ABI v2 (protocols/job-abi.md): imports phala.secret_len and phala.secret_read.
(module
  (import "phala" "secret_len" (func $secret_len (param i32) (result i32)))
  (import "phala" "secret_read" (func $secret_read (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  ;; bump allocator, as in echo.wat
  (func $alloc (export "alloc") (param $len i32) (result i32)
    (local $ptr i32) (local $end i32)
    (local.set $ptr (global.get $heap))
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
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
  ;; FNV-1a-32 of memory[$ptr .. $ptr + $len), continuing from $h
  (func $fnv (param $h i32) (param $ptr i32) (param $len i32) (result i32)
    (local $end i32)
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $ptr) (local.get $end)))
        (local.set $h (i32.mul (i32.xor (local.get $h) (i32.load8_u (local.get $ptr)))
                               (i32.const 16777619)))
        (local.set $ptr (i32.add (local.get $ptr) (i32.const 1)))
        (br $next)))
    (local.get $h))
  (func (export "run") (param $ptr i32) (param $len i32) (result i64)
    (local $slen i32) (local $sec i32) (local $h i32) (local $out i32) (local $i i32)
    (local $nib i32)
    (local.set $slen (call $secret_len (i32.const 0)))
    (if (i32.lt_s (local.get $slen) (i32.const 0))
      (then unreachable))
    (local.set $sec (call $alloc (local.get $slen)))
    (drop (call $secret_read (i32.const 0) (local.get $sec)))
    (local.set $h (call $fnv (i32.const 0x811c9dc5) (local.get $sec) (local.get $slen)))
    (local.set $h (call $fnv (local.get $h) (local.get $ptr) (local.get $len)))
    ;; wipe the copy of the secret before returning (good hygiene, not a guarantee)
    (memory.fill (local.get $sec) (i32.const 0) (local.get $slen))
    ;; 8 hex digits, most significant first
    (local.set $out (call $alloc (i32.const 8)))
    (loop $digit
      (local.set $nib (i32.and (i32.shr_u (local.get $h)
                                          (i32.sub (i32.const 28)
                                                   (i32.mul (local.get $i) (i32.const 4))))
                               (i32.const 15)))
      (i32.store8 (i32.add (local.get $out) (local.get $i))
                  (select (i32.add (local.get $nib) (i32.const 48))
                          (i32.add (local.get $nib) (i32.const 87))
                          (i32.lt_u (local.get $nib) (i32.const 10))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $digit (i32.lt_u (local.get $i) (i32.const 8))))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32)) (i64.const 8))))
