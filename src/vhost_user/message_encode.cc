// The encoding half of the vhost-user codec: typed messages and replies -> header + payload
// bytes + borrowed fds.
#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "vhostkit/vhost_user/message.h"

namespace vhostkit::vhost_user {

namespace {

wire::MemoryRegion to_wire(const memory::RegionSpec& s) noexcept {
  return {.guest_phys_addr = s.guest_phys_addr,
          .memory_size = s.size,
          .userspace_addr = s.userspace_addr,
          .mmap_offset = s.mmap_offset};
}

// ---- encoding ----------------------------------------------------------------------------

class Builder {
 public:
  Builder(std::uint32_t request, std::uint32_t flags) {
    out_.header.request = request;
    out_.header.flags = (flags & ~kVersionMask) | kVersion;
  }
  template <WireStruct T>
  void put(const T& v, std::size_t n = sizeof(T)) noexcept {
    std::memcpy(out_.payload_buf.data(), &v, n);
    out_.header.size = static_cast<std::uint32_t>(n);
  }
  void fd(int fd) noexcept { out_.fd_buf[out_.fd_count++] = fd; }
  OutMessage take() noexcept { return std::move(out_); }

 private:
  OutMessage out_;
};

Result<> need_fd(std::string_view name, const UniqueFd& fd) {
  if (!fd.valid()) return fail(Errc::invalid_argument, fmt::format("{} needs an fd", name));
  return {};
}

template <auto R>
Result<> put(Builder&, const NoPayload<R>&) {
  return {};
}

template <auto R>
Result<> put(Builder& b, const U64Payload<R>& m) {
  b.put(m.value);
  return {};
}

template <auto R>
Result<> put(Builder& b, const VringStatePayload<R>& m) {
  b.put(wire::VringState{m.index, m.num});
  return {};
}

template <auto R>
Result<> put(Builder& b, const VringFdPayload<R>& m) {
  std::uint64_t u = m.index;
  if (m.fd.valid()) {
    b.fd(m.fd.get());
  } else {
    u |= kVringNoFdMask;
  }
  b.put(u);
  return {};
}

template <auto R>
Result<> put(Builder& b, const FdPayload<R>& m) {
  if (auto r = need_fd(to_string(R), m.fd); !r) return r;
  b.fd(m.fd.get());
  return {};
}

template <auto R>
Result<> put(Builder& b, const UuidPayload<R>& m) {
  wire::Shared w{};
  std::memcpy(w.uuid, m.uuid.data(), m.uuid.size());
  b.put(w);
  return {};
}

Result<> put(Builder& b, const SetMemTable& m) {
  if (m.regions.size() > kMaxMemRegions) {
    return fail(Errc::too_many, fmt::format("{} with {} regions, at most {}", to_string(m.kRequest),
                                            m.regions.size(), kMaxMemRegions));
  }
  wire::Memory w{};
  w.nregions = static_cast<std::uint32_t>(m.regions.size());
  for (std::size_t i = 0; i < m.regions.size(); ++i) {
    if (!m.regions[i].fd.valid()) {
      return fail(Errc::invalid_argument,
                  fmt::format("{} region needs an fd", to_string(m.kRequest)));
    }
    w.regions[i] = to_wire(m.regions[i].spec);
    b.fd(m.regions[i].fd.get());
  }
  b.put(w, wire::kMemoryHeaderSize + m.regions.size() * sizeof(wire::MemoryRegion));
  return {};
}

Result<> put(Builder& b, const SetLogBase& m) {
  if (auto r = need_fd(to_string(m.kRequest), m.fd); !r) return r;
  b.put(wire::Log{m.mmap_size, m.mmap_offset});
  b.fd(m.fd.get());
  return {};
}

Result<> put(Builder& b, const SetVringAddr& m) {
  const memory::VringAddr& a = m.addr;
  b.put(wire::VringAddr{m.index, a.flags, a.desc_user_addr, a.used_user_addr, a.avail_user_addr,
                        a.log_guest_addr});
  return {};
}

Result<> put(Builder& b, const SendRarp& m) {
  std::uint64_t u = 0;
  std::memcpy(&u, m.mac.data(), m.mac.size());
  b.put(u);
  return {};
}

Result<> put(Builder& b, const Iotlb& m) {
  wire::IotlbMsg w{};
  w.iova = m.iova;
  w.size = m.size;
  w.uaddr = m.uaddr;
  w.perm = m.perm;
  w.type = m.type;
  b.put(w);
  return {};
}

Result<> put(Builder& b, const GetConfig& m) {
  if (m.size > kMaxConfigSize) {
    return fail(Errc::out_of_range, fmt::format("{} of {} bytes, at most {}", to_string(m.kRequest),
                                                m.size, kMaxConfigSize));
  }
  wire::Config w{};  // the request carries `size` zero bytes for the reply to fill
  w.offset = m.offset;
  w.size = m.size;
  w.flags = m.flags;
  b.put(w, wire::kConfigHeaderSize + m.size);
  return {};
}

Result<> put(Builder& b, const SetConfig& m) {
  if (m.data.size() > kMaxConfigSize) {
    return fail(Errc::out_of_range, fmt::format("{} of {} bytes, at most {}", to_string(m.kRequest),
                                                m.data.size(), kMaxConfigSize));
  }
  wire::Config w{};
  w.offset = m.offset;
  w.size = static_cast<std::uint32_t>(m.data.size());
  w.flags = m.flags;
  // An empty vector's data() may be null, and memcpy from null is undefined even for 0 bytes.
  if (!m.data.empty()) std::memcpy(w.region, m.data.data(), m.data.size());
  b.put(w, wire::kConfigHeaderSize + m.data.size());
  return {};
}

wire::Inflight to_wire(const Inflight& i) noexcept {
  wire::Inflight w{};
  w.mmap_size = i.mmap_size;
  w.mmap_offset = i.mmap_offset;
  w.num_queues = i.num_queues;
  w.queue_size = i.queue_size;
  return w;
}

Result<> put(Builder& b, const GetInflightFd& m) {
  b.put(to_wire(m.inflight));
  return {};
}

Result<> put(Builder& b, const SetInflightFd& m) {
  if (auto r = need_fd(to_string(m.kRequest), m.fd); !r) return r;
  b.put(to_wire(m.inflight));
  b.fd(m.fd.get());
  return {};
}

Result<> put(Builder& b, const AddMemReg& m) {
  if (auto r = need_fd(to_string(m.kRequest), m.region.fd); !r) return r;
  b.put(wire::SingleMemoryRegion{0, to_wire(m.region.spec)});
  b.fd(m.region.fd.get());
  return {};
}

Result<> put(Builder& b, const RemMemReg& m) {
  b.put(wire::SingleMemoryRegion{0, to_wire(m.spec)});
  return {};
}

Result<> put(Builder& b, const GetSharedObject& m) {
  wire::Shared w{};
  std::memcpy(w.uuid, m.uuid.data(), m.uuid.size());
  b.put(w);
  return {};
}

Result<> put(Builder& b, const SetDeviceStateFd& m) {
  if (auto r = need_fd(to_string(m.kRequest), m.fd); !r) return r;
  b.put(wire::DeviceStateTransfer{m.direction, m.phase});
  b.fd(m.fd.get());
  return {};
}

Result<> put(Builder& b, const BackendVringHostNotifier& m) {
  std::uint64_t u = m.index;
  if (m.fd.valid()) {
    b.fd(m.fd.get());
  } else {
    u |= kVringNoFdMask;
  }
  b.put(wire::VringArea{u, m.size, m.offset});
  return {};
}

}  // namespace

template <Encodable T>
Result<OutMessage> encode(const T& msg, std::uint32_t flags) {
  Builder b(static_cast<std::uint32_t>(T::kRequest), flags & ~kReplyFlag);
  if (auto r = put(b, msg); !r) return std::unexpected(std::move(r.error()));
  return b.take();
}

// Explicit instantiations: encode<T> is declared in the header for every message type.
#define VHOSTKIT_ENCODE(T) template Result<OutMessage> encode<T>(const T&, std::uint32_t);
VHOSTKIT_ENCODE(GetFeatures)
VHOSTKIT_ENCODE(SetFeatures)
VHOSTKIT_ENCODE(SetOwner)
VHOSTKIT_ENCODE(ResetOwner)
VHOSTKIT_ENCODE(SetMemTable)
VHOSTKIT_ENCODE(SetLogBase)
VHOSTKIT_ENCODE(SetLogFd)
VHOSTKIT_ENCODE(SetVringNum)
VHOSTKIT_ENCODE(SetVringAddr)
VHOSTKIT_ENCODE(SetVringBase)
VHOSTKIT_ENCODE(GetVringBase)
VHOSTKIT_ENCODE(SetVringKick)
VHOSTKIT_ENCODE(SetVringCall)
VHOSTKIT_ENCODE(SetVringErr)
VHOSTKIT_ENCODE(GetProtocolFeatures)
VHOSTKIT_ENCODE(SetProtocolFeatures)
VHOSTKIT_ENCODE(GetQueueNum)
VHOSTKIT_ENCODE(SetVringEnable)
VHOSTKIT_ENCODE(SendRarp)
VHOSTKIT_ENCODE(NetSetMtu)
VHOSTKIT_ENCODE(SetBackendReqFd)
VHOSTKIT_ENCODE(IotlbMsg)
VHOSTKIT_ENCODE(SetVringEndian)
VHOSTKIT_ENCODE(GetConfig)
VHOSTKIT_ENCODE(SetConfig)
VHOSTKIT_ENCODE(CloseCryptoSession)
VHOSTKIT_ENCODE(PostcopyAdvise)
VHOSTKIT_ENCODE(PostcopyListen)
VHOSTKIT_ENCODE(PostcopyEnd)
VHOSTKIT_ENCODE(GetInflightFd)
VHOSTKIT_ENCODE(SetInflightFd)
VHOSTKIT_ENCODE(GpuSetSocket)
VHOSTKIT_ENCODE(ResetDevice)
VHOSTKIT_ENCODE(VringKick)
VHOSTKIT_ENCODE(GetMaxMemSlots)
VHOSTKIT_ENCODE(AddMemReg)
VHOSTKIT_ENCODE(RemMemReg)
VHOSTKIT_ENCODE(SetStatus)
VHOSTKIT_ENCODE(GetStatus)
VHOSTKIT_ENCODE(GetSharedObject)
VHOSTKIT_ENCODE(SetDeviceStateFd)
VHOSTKIT_ENCODE(CheckDeviceState)
VHOSTKIT_ENCODE(BackendIotlbMsg)
VHOSTKIT_ENCODE(BackendConfigChange)
VHOSTKIT_ENCODE(BackendVringHostNotifier)
VHOSTKIT_ENCODE(BackendVringCall)
VHOSTKIT_ENCODE(BackendVringErr)
VHOSTKIT_ENCODE(BackendSharedObjectAdd)
VHOSTKIT_ENCODE(BackendSharedObjectRemove)
VHOSTKIT_ENCODE(BackendSharedObjectLookup)
#undef VHOSTKIT_ENCODE
// Every alternative of both variants must appear above.
static_assert(std::variant_size_v<FrontendMessage> + std::variant_size_v<BackendMessage> == 50);

OutMessage reply_u64(Request request, std::uint64_t value) {
  Builder b(static_cast<std::uint32_t>(request), kReplyFlag);
  b.put(value);
  return b.take();
}

OutMessage reply_u64(BackendRequest request, std::uint64_t value) {
  Builder b(static_cast<std::uint32_t>(request), kReplyFlag);
  b.put(value);
  return b.take();
}

OutMessage reply_ack(Request request, bool ok) { return reply_u64(request, ok ? 0 : 1); }

OutMessage reply_vring_state(Request request, std::uint32_t index, std::uint32_t num) {
  Builder b(static_cast<std::uint32_t>(request), kReplyFlag);
  b.put(wire::VringState{index, num});
  return b.take();
}

OutMessage reply_config(std::uint32_t offset, std::uint32_t flags,
                        std::span<const std::uint8_t> data) {
  Builder b(static_cast<std::uint32_t>(Request::get_config), kReplyFlag);
  if (data.empty()) return b.take();  // size 0 reports failure
  const auto n = std::min(data.size(), kMaxConfigSize);
  wire::Config w{};
  w.offset = offset;
  w.size = static_cast<std::uint32_t>(n);
  w.flags = flags;
  std::memcpy(w.region, data.data(), n);
  b.put(w, wire::kConfigHeaderSize + n);
  return b.take();
}

OutMessage reply_inflight(const Inflight& inflight, int fd) {
  Builder b(static_cast<std::uint32_t>(Request::get_inflight_fd), kReplyFlag);
  b.put(to_wire(inflight));
  if (fd >= 0) b.fd(fd);
  return b.take();
}

}  // namespace vhostkit::vhost_user
