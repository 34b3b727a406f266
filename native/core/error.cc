// error.cc: out-of-line throw for kernel code (see bts/common.h, throw_error).
#include "bts/common.h"

namespace bts {

void throw_error(const char* code, const char* message) { throw Error(code, message); }

}  // namespace bts
