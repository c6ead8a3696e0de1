// Fuzzes the vhost-user decoder: arbitrary header + payload + a fuzzed number of real fds.
// Must never crash, and every fd handed to the codec must be closed once the decoded message is
// gone (no leaks on any error path). A message that decodes must re-encode, and that encoding
// must decode to an equal message (every field; each fd naming the same file, in the same place).
//
// Input layout: [fd count byte][mode byte][12-byte header][payload...]
//   fd count % 9 memfds are attached (FdList holds at most 8, as the channel guarantees).
//   mode bit 0-1: 0/3 front-end request, 1 back-end request, 2 reply decoders.
//   mode bit 2: keep the header's own size field (else it is set to the payload length).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <utility>
#include <variant>
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

// The second decode holds dups of the first one's fds: equal means both absent, or both open on
// the same file (each fuzz fd is its own memfd, so a swapped pair of fds is caught too).
bool same(const UniqueFd& a, const UniqueFd& b) {
  if (a.valid() != b.valid()) return false;
  if (!a.valid()) return true;
  struct stat sa{}, sb{};
  return ::fstat(a.get(), &sa) == 0 && ::fstat(b.get(), &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

bool same(const memory::RegionSpec& a, const memory::RegionSpec& b) {
  return a.guest_phys_addr == b.guest_phys_addr && a.size == b.size &&
         a.userspace_addr == b.userspace_addr && a.mmap_offset == b.mmap_offset;
}

// Messages without fds have a defaulted ==; each kind with an fd is compared here. A message
// type with neither fails to compile, so a new one can't slip past the check.
template <typename T>
  requires std::equality_comparable<T>
bool same(const T& a, const T& b) {
  return a == b;
}
template <auto R>
bool same(const VringFdPayload<R>& a, const VringFdPayload<R>& b) {
  return a.index == b.index && same(a.fd, b.fd);
}
template <auto R>
bool same(const FdPayload<R>& a, const FdPayload<R>& b) {
  return same(a.fd, b.fd);
}
bool same(const memory::RegionFd& a, const memory::RegionFd& b) {
  return same(a.spec, b.spec) && same(a.fd, b.fd);
}
bool same(const SetMemTable& a, const SetMemTable& b) {
  if (a.regions.size() != b.regions.size()) return false;
  for (std::size_t i = 0; i < a.regions.size(); ++i) {
    if (!same(a.regions[i], b.regions[i])) return false;
  }
  return true;
}
bool same(const SetLogBase& a, const SetLogBase& b) {
  return a.mmap_size == b.mmap_size && a.mmap_offset == b.mmap_offset && same(a.fd, b.fd);
}
bool same(const SetInflightFd& a, const SetInflightFd& b) {
  return a.inflight == b.inflight && same(a.fd, b.fd);
}
bool same(const AddMemReg& a, const AddMemReg& b) { return same(a.region, b.region); }
bool same(const RemMemReg& a, const RemMemReg& b) { return same(a.spec, b.spec); }
bool same(const SetDeviceStateFd& a, const SetDeviceStateFd& b) {
  return a.direction == b.direction && a.phase == b.phase && same(a.fd, b.fd);
}
bool same(const BackendVringHostNotifier& a, const BackendVringHostNotifier& b) {
  return a.index == b.index && a.size == b.size && a.offset == b.offset && same(a.fd, b.fd);
}

// encode(msg) must decode again, to a message equal to msg.
template <typename Decoded, typename DecodeAgain>
void reencode(const Decoded& msg, DecodeAgain again) {
  auto out = encode<Decoded>(msg);
  check(out.has_value());
  check(out->header.size <= kMaxPayloadSize);
  auto back = again(out->header, out->payload(), dup_all(out->fds()));
  check(back.has_value());
  const Decoded* decoded = std::get_if<Decoded>(&*back);
  if (decoded == nullptr || !same(msg, *decoded)) {
    std::fprintf(
        stderr, "vhost_user_decode_fuzz: request %u decoded, re-encoded and decoded to %s\n",
        out->header.request, decoded == nullptr ? "another message type" : "a different message");
    __builtin_trap();
  }
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
