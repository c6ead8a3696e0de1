// Socket helpers for tests: a fresh directory for unix socket paths, and whether a back-end's
// unix socket accepts connections yet.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <filesystem>
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

// A directory of its own under /tmp for a test's unix sockets, removed with everything in it
// when the object goes: sockets a test binds leave nothing behind. (sun_path holds 107 bytes,
// so the directory stays short.)
class TempSocketDir {
 public:
  TempSocketDir() {
    char d[] = "/tmp/vk-sock.XXXXXX";
    EXPECT_NE(::mkdtemp(d), nullptr) << "mkdtemp";
    dir_ = d;
  }
  ~TempSocketDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  TempSocketDir(const TempSocketDir&) = delete;
  TempSocketDir& operator=(const TempSocketDir&) = delete;
  // `name` inside the directory.
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
};

}  // namespace vhostkit::testing
