// Socket helpers for tests: whether a back-end's unix socket accepts connections yet.
#pragma once

#include <sys/stat.h>

#include <string>

namespace vhostkit::testing {

// The unix socket at `path` accepts connections: vhost_user::listen_unix makes the path appear
// only once the socket listens (bound under a staging name, then renamed), so the socket file
// existing is the answer, with no probe connection (which the server would count as a session).
// /proc/net/unix can't be asked instead: it lists a socket under the name it was bound to, the
// staging name. Callers use fresh paths: a stale file left by a dead process would read as ready.
inline bool unix_listening(const std::string& path) {
  struct stat st{};
  return ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

}  // namespace vhostkit::testing
