;; stream_echo: a streaming job (job ABI v3, protocols/job-abi.md) that returns each piece of
;; its input unchanged; finish returns nothing.
;; Memory stays bounded whatever the total input: every piece goes to the same buffer at 1024,
;; which grows only when a piece is larger than it, and is returned in place.
(module
  (memory (export "memory") 1)
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
  (func (export "feed") (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len))))
  (func (export "finish") (result i64)
    (i64.const 0)))
