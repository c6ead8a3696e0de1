// Fuzzes the vhost-user decoder: arbitrary header + payload + a fuzzed number of real fds.
// Must never crash, and every fd handed to the codec must be closed once the decoded message is
// gone (no leaks on any error path). A message that decodes must re-encode and decode again.
//
// Input layout: [fd count byte][mode byte][12-byte header][payload...]
//   fd count % 9 memfds are attached (FdList holds at most 8, as the channel guarantees).
//   mode bit 0-1: 0/3 front-end request, 1 back-end request, 2 reply decoders.
//   mode bit 2: keep the header's own size field (else it is set to the payload length).
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "vhostkit/vhost_user/message.h"

using namespace vhostkit;
using namespace vhostkit::vhost_user;

namespace {

void check(bool ok) {
  if (!ok) __builtin_trap();
}

bool is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1 || errno != EBADF; }

FdList dup_all(std::span<const int> fds) {
  FdList out;
  for (int fd : fds) out.push_back(UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)));
  return out;
}

template <typename Decoded, typename DecodeAgain>
void reencode(const Decoded& msg, DecodeAgain again) {
  auto out = encode<Decoded>(msg);
  check(out.has_value());
  check(out->header.size <= kMaxPayloadSize);
  auto back = again(out->header, out->payload(), dup_all(out->fds()));
  check(back.has_value());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2 + sizeof(Header)) return 0;
  const std::size_t nfds = data[0] % (kMaxFds + 1);
  const std::uint8_t mode = data[1];
  Header header;
  std::memcpy(&header, data + 2, sizeof(Header));
  std::span<const std::uint8_t> payload(data + 2 + sizeof(Header), size - 2 - sizeof(Header));
  if (payload.size() > kMaxPayloadSize) payload = payload.first(kMaxPayloadSize);
  if ((mode & 4) == 0) header.size = static_cast<std::uint32_t>(payload.size());

  std::vector<int> raw;
  FdList fds;
  for (std::size_t i = 0; i < nfds; ++i) {
    const int fd = ::memfd_create("fuzz", MFD_CLOEXEC);
    if (fd < 0) break;
    raw.push_back(fd);
    fds.push_back(UniqueFd(fd));
  }

  switch (mode & 3) {
    case 1: {
      auto m = decode_backend(header, payload, std::move(fds));
      if (m) {
        auto again = [](auto&&... a) { return decode_backend(std::forward<decltype(a)>(a)...); };
        std::visit([&](const auto& v) { reencode(v, again); }, *m);
      }
      break;
    }
    case 2: {
      Received r;
      r.header = header;
      if (header.size <= kMaxPayloadSize && header.size <= payload.size()) {
        std::memcpy(r.payload_buf.data(), payload.data(), header.size);
      } else {
        r.header.size = 0;
      }
      r.fds = std::move(fds);
      const auto req = static_cast<Request>(header.request);
      (void)decode_u64_reply(r, req);
      (void)decode_u64_reply(r, static_cast<BackendRequest>(header.request));
      (void)decode_vring_state_reply(r, req);
      (void)decode_config_reply(r);
      (void)decode_inflight_reply(std::move(r));
      break;
    }
    default: {
      auto m = decode(header, payload, std::move(fds));
      if (m) {
        auto again = [](auto&&... a) { return decode(std::forward<decltype(a)>(a)...); };
        std::visit([&](const auto& v) { reencode(v, again); }, *m);
      }
      break;
    }
  }

  // Every message is destroyed by now: each fd must have been closed exactly once.
  for (int fd : raw) check(!is_open(fd));
  return 0;
}
