// Leak counters, read from /proc: the open fds and the mappings of this process (or of a child,
// for hostile_peer). The unit tests, the fuzz targets and hostile_peer all count with these, so a
// leak means the same thing everywhere. No gtest here: the fuzz targets include it too.
// Also the fd helpers of the codec tests: a distinct fd to send, and whether two fds are one file.
#pragma once

#include <dirent.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>

#include "vhostkit/unique_fd.h"

namespace vhostkit::testing {

// pid 0 names this process.
inline std::string proc_dir(pid_t pid) {
  return pid == 0 ? std::string("/proc/self/") : "/proc/" + std::to_string(pid) + "/";
}

// Open fds of process `pid` (0: this process, not counting the fd this count reads through);
// 0 if /proc/<pid>/fd can't be read.
inline std::size_t open_fd_count(pid_t pid = 0) {
  DIR* d = ::opendir((proc_dir(pid) + "fd").c_str());
  if (d == nullptr) return 0;
  std::size_t n = 0;
  while (const dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
  ::closedir(d);
  return pid == 0 && n > 0 ? n - 1 : n;
}

// This process's open fds of the kinds vhostkit creates: sockets; eventfds, epoll and io_uring
// (anon inodes); memfds. libFuzzer opens and closes pipes and /dev/null of its own between
// inputs, so a fuzz target counts these only. `print` lists them on stderr (to name a leak).
inline std::size_t vhostkit_fd_count(bool print = false) {
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return 0;
  std::size_t n = 0;
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    char path[300], target[256];
    std::snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
    const ssize_t len = ::readlink(path, target, sizeof target - 1);
    if (len <= 0) continue;
    const std::string_view t(target, static_cast<std::size_t>(len));
    if (t.starts_with("socket:") || t.starts_with("anon_inode:") || t.starts_with("/memfd:")) {
      ++n;
      if (print)
        std::fprintf(stderr, "  fd %s -> %.*s\n", e->d_name, static_cast<int>(len), target);
    }
  }
  ::closedir(d);
  return n;
}

// Lines of /proc/<pid>/maps (0: this process) that contain `part`; an empty `part` counts every
// mapping. Counting every line is noisy in-process: the allocator (ASan's especially) maps memory
// of its own while a test runs, so in-process tests count the mappings of their own files, e.g.
// "/memfd:vhostkit-test" or "socket:[" (a mapped AF_PACKET ring).
inline std::size_t mapping_count(std::string_view part = {}, pid_t pid = 0) {
  std::ifstream maps(proc_dir(pid) + "maps");
  std::size_t n = 0;
  for (std::string line; std::getline(maps, line);) n += line.find(part) != std::string::npos;
  return n;
}

// File-backed mappings of process `pid` (0: this process): those with a path that is not a
// [pseudo] name like [heap] or [stack]. Guest memory, dirty logs and images are file-backed; the
// anonymous regions an allocator adds as its heap grows are not.
inline std::size_t file_mapping_count(pid_t pid = 0) {
  std::ifstream maps(proc_dir(pid) + "maps");
  std::size_t n = 0;
  for (std::string line; std::getline(maps, line);) {
    // "start-end perms offset dev inode [path]"
    std::istringstream f(line);
    std::string field, path;
    for (int i = 0; i < 5; ++i) f >> field;
    f >> path;
    n += !path.empty() && path[0] != '[';
  }
  return n;
}

// True if some mapping of this process starts at `addr`.
inline bool is_mapping_start(const void* addr) {
  std::ifstream maps("/proc/self/maps");
  const auto want = reinterpret_cast<std::uintptr_t>(addr);
  for (std::string line; std::getline(maps, line);) {
    if (std::stoull(line.substr(0, line.find('-')), nullptr, 16) == want) return true;
  }
  return false;
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

}  // namespace vhostkit::testing
