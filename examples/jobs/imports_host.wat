;; imports_host: asks for a host function. Job ABI v2 grants only phala.secret_len and
;; phala.secret_read (protocols/job-abi.md), so this module is refused.
(module
  (import "env" "print" (func $print (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "run") (param $ptr i32) (param $len i32) (result i64)
    (call $print (local.get $ptr) (local.get $len))
    (i64.const 0)))
