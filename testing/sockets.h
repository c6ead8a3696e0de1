// Socket helpers for tests: whether a back-end's unix socket accepts connections yet.
#pragma once

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

namespace vhostkit::testing {

// The unix socket at `path` accepts connections. bind() makes the path a moment before listen(),
// and a connect() in between is refused (seen under ASan), so the path existing is not enough.
// Read from /proc/net/unix, whose flags say SO_ACCEPTCON (0x10000) for a listener: no probe
// connection, which the server would count as a session.
inline bool unix_listening(const std::string& path) {
  std::ifstream in("/proc/net/unix");
  std::string line;
  while (std::getline(in, line)) {
    if (line.size() <= path.size() ||
        line.compare(line.size() - path.size(), path.size(), path) != 0 ||
        line[line.size() - path.size() - 1] != ' ') {
      continue;
    }
    char flags[16] = {};
    if (std::sscanf(line.c_str(), "%*s %*s %*s %15s", flags) == 1 &&
        std::strcmp(flags, "00010000") == 0) {
      return true;
    }
  }
  return false;
}

}  // namespace vhostkit::testing
