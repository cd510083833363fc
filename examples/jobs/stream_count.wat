;; stream_count: a streaming job (job ABI v3, protocols/job-abi.md) that counts the bytes and
;; the words (runs of bytes other than space, \t, \n, \r; a word may span pieces) of its whole
;; input. feed returns nothing; finish returns "<bytes> <words>" in ASCII decimal, e.g. "11 2".
;; The counts are 64-bit globals; memory stays bounded whatever the total input: every piece
;; goes to the same buffer at 1024, which grows only when a piece is larger than it, and finish
;; writes its output to [0, 41) below the buffer.
(module
  (memory (export "memory") 1)
  (global $bytes (mut i64) (i64.const 0))
  (global $words (mut i64) (i64.const 0))
  (global $in_word (mut i32) (i32.const 0))  ;; whether the last byte fed was inside a word
  (func (export "alloc") (param $len i32) (result i32)
    (local $pages i32)
    ;; pages needed for [1024, 1024 + len), in 64-bit arithmetic so that it cannot overflow
    (local.set $pages
      (i32.wrap_i64 (i64.shr_u (i64.add (i64.extend_i32_u (local.get $len)) (i64.const 66559))
                               (i64.const 16))))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then unreachable))))
    (i32.const 1024))
  (func $is_space (param $c i32) (result i32)
    (i32.or (i32.or (i32.eq (local.get $c) (i32.const 32)) (i32.eq (local.get $c) (i32.const 9)))
            (i32.or (i32.eq (local.get $c) (i32.const 10)) (i32.eq (local.get $c) (i32.const 13)))))
  (func (export "feed") (param $ptr i32) (param $len i32) (result i64)
    (local $p i32) (local $end i32) (local $in_word i32) (local $words i64)
    (local.set $in_word (global.get $in_word))
    (local.set $words (global.get $words))
    (local.set $p (local.get $ptr))
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
        (if (call $is_space (i32.load8_u (local.get $p)))
          (then (local.set $in_word (i32.const 0)))
          (else
            (if (i32.eqz (local.get $in_word))
              (then (local.set $words (i64.add (local.get $words) (i64.const 1)))))
            (local.set $in_word (i32.const 1))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next)))
    (global.set $in_word (local.get $in_word))
    (global.set $words (local.get $words))
    (global.set $bytes (i64.add (global.get $bytes) (i64.extend_i32_u (local.get $len))))
    (i64.const 0))  ;; no output: [0, 0)
  ;; writes $n in decimal at $pos and returns the position after its last digit
  (func $put (param $pos i32) (param $n i64) (result i32)
    (local $digits i32) (local $m i64) (local $i i32)
    (local.set $m (local.get $n))
    (local.set $digits (i32.const 1))
    (block $counted
      (loop $more
        (br_if $counted (i64.lt_u (local.get $m) (i64.const 10)))
        (local.set $m (i64.div_u (local.get $m) (i64.const 10)))
        (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
        (br $more)))
    (local.set $i (local.get $digits))
    (loop $write
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (local.get $pos) (local.get $i))
                  (i32.wrap_i64 (i64.add (i64.const 48) (i64.rem_u (local.get $n) (i64.const 10)))))
      (local.set $n (i64.div_u (local.get $n) (i64.const 10)))
      (br_if $write (i32.gt_u (local.get $i) (i32.const 0))))
    (i32.add (local.get $pos) (local.get $digits)))
  (func (export "finish") (result i64)
    (local $end i32)
    (local.set $end (call $put (i32.const 0) (global.get $bytes)))
    (i32.store8 (local.get $end) (i32.const 32))
    (local.set $end (call $put (i32.add (local.get $end) (i32.const 1)) (global.get $words)))
    ;; output [0, end): out_ptr = 0
    (i64.extend_i32_u (local.get $end))))
