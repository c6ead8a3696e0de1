// Helpers for the port tests: a private network (and mount) namespace per test process, shell
// setup inside it, and hand-built frames with their checksums.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace vhostkit::net::testing {

// Moves this process into fresh network and mount namespaces, both gone when it exits: /sys is
// remounted so /sys/class/net shows this namespace's interfaces. IPv6 is off so no router
// solicitations or DAD frames show up among the test's own. Returns false if not permitted.
inline bool enter_private_netns() {
  if (::unshare(CLONE_NEWNET | CLONE_NEWNS) != 0) return false;
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return false;
  ::umount2("/sys", MNT_DETACH);
  if (::mount("sysfs", "/sys", "sysfs", 0, nullptr) != 0) return false;
  std::ofstream("/proc/sys/net/ipv6/conf/all/disable_ipv6") << "1";
  std::ofstream("/proc/sys/net/ipv6/conf/default/disable_ipv6") << "1";
  return std::system("ip link set lo up") == 0;
}

// Runs a shell command; true when it exited 0.
inline bool sh(const std::string& cmd) {
  return std::system((cmd + " >/dev/null 2>&1").c_str()) == 0;
}

inline bool iface_exists(const std::string& name) {
  return std::filesystem::exists("/sys/class/net/" + name);
}

inline std::string read_sys(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  std::getline(f, s);
  return s;
}

inline bool wait_readable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1;
}

inline bool parse_mac(const std::string& text, std::uint8_t out[6]) {
  unsigned v[6];
  if (std::sscanf(text.c_str(), "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6)
    return false;
  for (int i = 0; i < 6; ++i) out[i] = static_cast<std::uint8_t>(v[i]);
  return true;
}

// The Internet checksum (RFC 1071) of `len` bytes, seeded with `sum`.
inline std::uint16_t inet_checksum(const std::uint8_t* p, std::size_t len, std::uint32_t sum = 0) {
  for (std::size_t i = 0; i + 1 < len; i += 2) sum += (p[i] << 8) | p[i + 1];
  if (len & 1) sum += p[len - 1] << 8;
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<std::uint16_t>(~sum);
}

inline void put16(std::uint8_t* p, std::uint16_t v) {
  p[0] = static_cast<std::uint8_t>(v >> 8);
  p[1] = static_cast<std::uint8_t>(v);
}
inline std::uint16_t get16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>((p[0] << 8) | p[1]);
}

// Ethernet + IPv4 header (20 bytes, no options) for `payload_len` bytes of L4 after it.
inline std::vector<std::uint8_t> eth_ipv4(const std::uint8_t dst_mac[6],
                                          const std::uint8_t src_mac[6],
                                          const std::uint8_t src_ip[4],
                                          const std::uint8_t dst_ip[4], std::uint8_t proto,
                                          std::size_t payload_len) {
  std::vector<std::uint8_t> f(14 + 20 + payload_len, 0);
  std::memcpy(&f[0], dst_mac, 6);
  std::memcpy(&f[6], src_mac, 6);
  put16(&f[12], 0x0800);
  std::uint8_t* ip = &f[14];
  ip[0] = 0x45;
  put16(ip + 2, static_cast<std::uint16_t>(20 + payload_len));
  put16(ip + 4, 0x1234);
  ip[8] = 64;
  ip[9] = proto;
  std::memcpy(ip + 12, src_ip, 4);
  std::memcpy(ip + 16, dst_ip, 4);
  put16(ip + 10, inet_checksum(ip, 20));
  return f;
}

}  // namespace vhostkit::net::testing
