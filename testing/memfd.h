// Helpers shared by the memory module's tests: memfds, and the count of their mappings (the
// counters themselves are testing/fd_count.h's).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

#include "testing/fd_count.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::memory::testing {

inline UniqueFd make_memfd(std::uint64_t size) {
  UniqueFd fd(::memfd_create("vhostkit-test", MFD_CLOEXEC));
  if (fd.valid() && ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) fd.reset();
  return fd;
}

inline UniqueFd dup_fd(const UniqueFd& fd) { return UniqueFd(::dup(fd.get())); }

// Mappings of make_memfd()'s memfds: counting every mapping would be noisy, the allocator (ASan's
// especially) maps memory of its own while a test runs.
inline std::size_t mapping_count() {
  return vhostkit::testing::mapping_count("/memfd:vhostkit-test");
}

}  // namespace vhostkit::memory::testing
