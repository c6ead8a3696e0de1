// Test helpers for fd accounting: every test that hands fds to the codec checks none leak.
#pragma once

#include <dirent.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cstddef>

#include "vhostkit/unique_fd.h"

namespace vhostkit::vhost_user::test {

// Number of open fds in this process (entries of /proc/self/fd, minus the one opendir uses).
inline std::size_t open_fd_count() {
  std::size_t n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return 0;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(d);
  return n - 1;
}

// A memfd: unlike eventfds (which share one anon inode) each has its own inode, so
// same_file() can tell them apart.
inline UniqueFd make_fd() { return UniqueFd(::memfd_create("vhost-user-test", MFD_CLOEXEC)); }

// Do two fds name the same open file?
inline bool same_file(int a, int b) {
  struct stat sa{}, sb{};
  if (::fstat(a, &sa) != 0 || ::fstat(b, &sb) != 0) return false;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

}  // namespace vhostkit::vhost_user::test
