;; memory_bomb: grows its memory one page at a time, touching every page, until memory.grow
;; fails (returns -1 at the executor's cap); then it writes past the end, which traps.
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "run") (param $ptr i32) (param $len i32) (result i64)
    (local $old i32)
    (loop $grow
      (local.set $old (memory.grow (i32.const 1)))
      (if (i32.ne (local.get $old) (i32.const -1))
        (then
          (i32.store8 (i32.mul (local.get $old) (i32.const 65536)) (i32.const 1))
          (br $grow))))
    (i32.store8 (i32.mul (memory.size) (i32.const 65536)) (i32.const 1))
    (i64.const 0)))
