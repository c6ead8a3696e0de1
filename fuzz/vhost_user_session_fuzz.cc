// Fuzzes BackendSession with sequences of front-end messages over a socketpair, on a device
// with an echo backend. Must not crash, hang or leak (fds are checked at the end of each input).
//
// Input: records of
//   u8  request number
//   u8  flag selector: bit 0 NEED_REPLY, bit 1 REPLY (illegal from a front-end), bit 2 version 0
//   u16 payload length (little-endian; over 300 is clamped)
//   u8  fd selector: bits 0-3 fd count (0..9), bit 4 eventfds instead of 64 KiB memfds
//   payload bytes (as many as remain, up to the length)
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <vector>

#include <spdlog/spdlog.h>

#include "fuzz_util.h"
#include "vhostkit/vhost/backend.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost_user/backend_session.h"
#include "vhostkit/virtio/features.h"

namespace {

using namespace vhostkit;
using namespace vhostkit::vhost_user;

class Echo : public vhost::DeviceBackend {
 public:
  std::uint64_t features() const noexcept override {
    return virtio::bit(virtio::feature::version_1) | virtio::bit(virtio::feature::ring_event_idx) |
           virtio::bit(virtio::feature::ring_indirect_desc);
  }
  std::uint16_t num_queues() const noexcept override { return 2; }
  Result<> read_config(std::uint32_t offset, std::span<std::uint8_t> out) const override {
    if (offset > 8 || out.size() > 8 - offset) return fail(Errc::out_of_range, "past config");
    std::memset(out.data(), 0x5a, out.size());
    return {};
  }
  bool handle_queue(vhost::Queue& q) noexcept override {
    auto& vq = q.vq();
    std::array<iovec, 8> segs;
    bool did = false;
    for (int n = 0; n < 16 && vq.pending() > 0; ++n) {
      did = true;
      auto c = vq.pop(segs);
      if (!c) {
        if (virtq::breaks_queue(c.error())) break;
        continue;
      }
      std::uint32_t len = 0;
      if (!c->readable.empty() && !c->writable.empty()) {
        len = static_cast<std::uint32_t>(
            std::min(c->readable[0].iov_len, c->writable[0].iov_len));
        std::memmove(c->writable[0].iov_base, c->readable[0].iov_base, len);
      }
      vq.push_used(c->head, len);
    }
    if (did) q.publish_and_notify();
    return did;
  }
};

int make_fd(bool event) {
  if (event) return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  const int fd = ::memfd_create("fuzz-guest", MFD_CLOEXEC);
  if (fd >= 0 && ::ftruncate(fd, 64 << 10) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void send_record(int sock, std::uint32_t request, std::uint32_t flags,
                 const std::uint8_t* payload, std::size_t len, const std::vector<int>& fds) {
  std::vector<std::uint8_t> buf(12 + len);
  const std::uint32_t size = static_cast<std::uint32_t>(len);
  std::memcpy(buf.data(), &request, 4);
  std::memcpy(buf.data() + 4, &flags, 4);
  std::memcpy(buf.data() + 8, &size, 4);
  if (len != 0) std::memcpy(buf.data() + 12, payload, len);
  iovec iov{buf.data(), buf.size()};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(cmsghdr) std::uint8_t cbuf[CMSG_SPACE(sizeof(int) * 16)] = {};
  if (!fds.empty()) {
    mh.msg_control = cbuf;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  (void)::sendmsg(sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
}

// Reads and drops whatever the back-end replied, so the socket never fills up.
void drain(int sock) {
  std::uint8_t buf[4096];
  while (::recv(sock, buf, sizeof buf, MSG_DONTWAIT) > 0) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static bool init = [] {
    spdlog::set_level(spdlog::level::off);
    return true;
  }();
  (void)init;
  static Echo backend;
  static vhost::Device device(backend, vhost::DeviceOptions{.name = "fuzz"});
  static std::size_t baseline = 0;

  {
    auto pair = socketpair();
    if (!pair) return 0;
    const int fe = pair->second.fd();
    SessionOptions opts;
    opts.set_mtu = [](std::uint16_t) -> Result<> { return {}; };
    opts.send_rarp = [](const Mac&) -> Result<> { return {}; };
    BackendSession session(device, std::move(pair->first), opts);
    std::size_t pos = 0;
    for (int records = 0; records < 64 && pos + 5 <= size; ++records) {
      const std::uint8_t req = data[pos];
      const std::uint8_t sel = data[pos + 1];
      std::size_t len = data[pos + 2] | (std::size_t{data[pos + 3]} << 8);
      const std::uint8_t fdsel = data[pos + 4];
      pos += 5;
      len = std::min({len, std::size_t{300}, size - pos});
      std::uint32_t flags = (sel & 4) ? 0 : kVersion;
      if (sel & 1) flags |= kNeedReplyFlag;
      if (sel & 2) flags |= kReplyFlag;
      std::vector<int> fds;
      const unsigned nfds = std::min<unsigned>(fdsel & 0x0f, 9);
      for (unsigned i = 0; i < nfds; ++i) {
        const int fd = make_fd((fdsel & 0x10) != 0);
        if (fd >= 0) fds.push_back(fd);
      }
      send_record(fe, req, flags, data + pos, len, fds);
      for (int fd : fds) ::close(fd);  // the session has its own copies now
      pos += len;
      auto r = session.serve_one();
      drain(fe);
      if (!r) break;
    }
    session.close();
  }
  // After the session: the device is reset, every fd it got is closed.
  const std::size_t now = fuzz::fd_count();
  if (baseline == 0) baseline = now;
  if (now > baseline) {
    fprintf(stderr, "fd leak: %zu open fds after the input, %zu after the first\n", now, baseline);
    fuzz::fd_count(true);
    __builtin_trap();
  }
  return 0;
}
