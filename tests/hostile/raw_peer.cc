#include "raw_peer.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "testing/raw_send.h"
#include "vhostkit/vhost_user/backend_session.h"
#include "vhostkit/virtio/features.h"

namespace vhostkit::hostile {

using namespace vhost_user;

const char* to_string(Answer a) noexcept {
  switch (a) {
    case Answer::ack: return "accepted";
    case Answer::nack: return "refused";
    case Answer::closed: return "closed";
    case Answer::silent: return "no reply";
  }
  return "?";
}

Result<std::unique_ptr<RawPeer>> RawPeer::connect(const std::string& path) {
  auto ch = connect_unix(path);
  if (!ch) return std::unexpected(ch.error());
  std::unique_ptr<RawPeer> p(new RawPeer);
  p->ch_ = std::move(*ch);
  // Long enough for a back-end still tearing down the previous connection (a stalled case costs
  // it one 1 s channel timeout) to get to us.
  if (auto r = p->ch_.set_timeout(std::chrono::milliseconds(3000)); !r)
    return std::unexpected(r.error());
  p->memfd_ = UniqueFd(::memfd_create("vk-hostile-guest", MFD_CLOEXEC));
  if (!p->memfd_ || ::ftruncate(p->memfd_.get(), kMemSize) != 0) return fail_errno("memfd");
  void* m = ::mmap(nullptr, kMemSize, PROT_READ | PROT_WRITE, MAP_SHARED, p->memfd_.get(), 0);
  if (m == MAP_FAILED) return fail_errno("mmap");
  p->mem_ = static_cast<std::uint8_t*>(m);
  return p;
}

RawPeer::~RawPeer() {
  rings_.clear();
  if (mem_ != nullptr) ::munmap(mem_, kMemSize);
}

UniqueFd RawPeer::dup_memfd() const { return UniqueFd(::fcntl(memfd_.get(), F_DUPFD_CLOEXEC, 0)); }

memory::RegionSpec RawPeer::region() const noexcept {
  return {.guest_phys_addr = kGpaBase, .size = kMemSize, .userspace_addr = uva(), .mmap_offset = 0};
}

bool RawPeer::send_bytes(std::span<const std::uint8_t> bytes) {
  return ::send(sock(), bytes.data(), bytes.size(), MSG_NOSIGNAL) ==
         static_cast<ssize_t>(bytes.size());
}

bool RawPeer::send_raw(const Header& h, std::span<const std::uint8_t> payload,
                       std::span<const int> fds) {
  return test::send_raw(sock(), h, payload, fds);
}

Answer RawPeer::raw_request(Request r, std::span<const std::uint8_t> payload,
                            std::span<const int> fds) {
  Header h{static_cast<std::uint32_t>(r), kVersion | kNeedReplyFlag,
           static_cast<std::uint32_t>(payload.size())};
  if (!send_raw(h, payload, fds)) return Answer::closed;
  return read_ack(r);
}

Answer RawPeer::read_ack(Request r) {
  auto rep = ch_.recv();
  if (!rep) {
    return rep.error().code == Errc::would_block ? Answer::silent : Answer::closed;
  }
  auto v = decode_u64_reply(*rep, r);
  if (!v) return Answer::silent;  // a reply to something else: not an answer to this
  return *v == 0 ? Answer::ack : Answer::nack;
}

bool RawPeer::closed_within(std::chrono::milliseconds wait) {
  pollfd p{sock(), POLLIN, 0};
  if (::poll(&p, 1, static_cast<int>(wait.count())) <= 0) return false;
  std::uint8_t b;
  return ::recv(sock(), &b, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

Result<std::uint64_t> RawPeer::get_u64(Request r) {
  Header h{static_cast<std::uint32_t>(r), kVersion, 0};
  if (auto s = ch_.send(h, {}); !s) return std::unexpected(s.error());
  auto rep = ch_.recv();
  if (!rep) return std::unexpected(rep.error());
  return decode_u64_reply(*rep, r);
}

Result<VringState> RawPeer::get_vring_base(std::uint32_t index) {
  if (auto r = ch_.send_message(GetVringBase{index, 0}); !r) return std::unexpected(r.error());
  auto rep = ch_.recv();
  if (!rep) return std::unexpected(rep.error());
  return decode_vring_state_reply(*rep, Request::get_vring_base);
}

Result<> RawPeer::handshake() {
  auto offered = get_u64(Request::get_features);
  if (!offered) return std::unexpected(offered.error());
  offered_ = *offered;
  const std::uint64_t pf = virtio::bit(virtio::feature::protocol_features);
  if ((offered_ & pf) == 0) return fail(Errc::unsupported, "no PROTOCOL_FEATURES offered");
  auto proto = get_u64(Request::get_protocol_features);
  if (!proto) return std::unexpected(proto.error());
  const std::uint64_t want =
      *proto & (protocol_bit(protocol_feature::reply_ack) | protocol_bit(protocol_feature::mq) |
                protocol_bit(protocol_feature::config) |
                protocol_bit(protocol_feature::configure_mem_slots));
  if (auto r = ch_.send_message(SetProtocolFeatures{want}); !r) return r;
  reply_ack_ = (want & protocol_bit(protocol_feature::reply_ack)) != 0;
  if (auto r = ok(SetOwner{}); !r) return r;
  features_ = offered_ & (virtio::bit(virtio::feature::version_1) |
                          virtio::bit(virtio::feature::ring_indirect_desc) | pf);
  return ok(SetFeatures{features_});
}

Result<> RawPeer::set_mem_table() {
  SetMemTable t;
  t.regions.push_back(memory::RegionFd{region(), dup_memfd()});
  return ok(t);
}

Result<> RawPeer::setup_ring(std::uint32_t i) {
  if (rings_.size() <= i) rings_.resize(i + 1);
  Ring& r = rings_[i];
  r.dq = std::make_unique<virtq::DriverQueue>();
  const std::size_t off = i * kRingStride;
  const auto layout = virtq::DriverRingLayout::for_size(kRingSize);
  auto span = std::span<std::byte>(reinterpret_cast<std::byte*>(mem_ + off), layout.total_bytes);
  if (auto res = r.dq->init(span, gpa(off), kRingSize, features_); !res) return res;
  r.kick = make_eventfd();
  r.call = make_eventfd();
  r.err = make_eventfd();
  r.avail_idx = 0;
  if (auto res = ok(SetVringNum{i, kRingSize}); !res) return res;
  if (auto res = ok(SetVringBase{i, 0}); !res) return res;
  SetVringAddr a;
  a.index = i;
  a.addr.desc_user_addr = uva(off + layout.desc_offset);
  a.addr.avail_user_addr = uva(off + layout.avail_offset);
  a.addr.used_user_addr = uva(off + layout.used_offset);
  if (auto res = ok(a); !res) return res;
  auto dup = [](const UniqueFd& fd) { return UniqueFd(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0)); };
  SetVringErr e;
  e.index = static_cast<std::uint8_t>(i);
  e.fd = dup(r.err);
  if (auto res = ok(e); !res) return res;
  SetVringCall c;
  c.index = static_cast<std::uint8_t>(i);
  c.fd = dup(r.call);
  if (auto res = ok(c); !res) return res;
  SetVringKick k;
  k.index = static_cast<std::uint8_t>(i);
  k.fd = dup(r.kick);
  if (auto res = ok(k); !res) return res;
  return ok(SetVringEnable{i, 1});
}

Result<> RawPeer::bring_up(std::uint32_t rings) {
  if (auto r = handshake(); !r) return r;
  if (auto r = set_mem_table(); !r) return r;
  for (std::uint32_t i = 0; i < rings; ++i) {
    if (auto r = setup_ring(i); !r) return r;
  }
  return {};
}

void RawPeer::post_head(std::uint32_t i, std::uint16_t head, std::uint16_t idx_step) {
  Ring& r = rings_.at(i);
  virtio::VirtqAvail* avail = r.dq->avail();
  avail->ring[r.avail_idx % kRingSize] = head;
  r.avail_idx = static_cast<std::uint16_t>(r.avail_idx + idx_step);
  // Release: the descriptors and the avail slot written above are visible before the new idx.
  std::atomic_ref<std::uint16_t>(avail->idx).store(r.avail_idx, std::memory_order_release);
}

void RawPeer::kick(std::uint32_t i) {
  const std::uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(rings_.at(i).kick.get(), &one, sizeof one);
}

std::uint16_t RawPeer::used_idx(std::uint32_t i) {
  // Acquire: the used elements the device wrote before idx are visible after it.
  return std::atomic_ref<std::uint16_t>(rings_.at(i).dq->used()->idx)
      .load(std::memory_order_acquire);
}

virtio::VirtqUsedElem RawPeer::used_elem(std::uint32_t i, std::uint16_t slot) {
  return rings_.at(i).dq->used()->ring[slot % kRingSize];
}

RawPeer::RingEvent RawPeer::wait_ring(std::uint32_t i, std::uint16_t count,
                                      std::chrono::milliseconds wait) {
  const auto deadline = std::chrono::steady_clock::now() + wait;
  for (;;) {
    if (static_cast<std::uint16_t>(used_idx(i) - count) < 0x8000) return RingEvent::used;
    pollfd p{rings_.at(i).err.get(), POLLIN, 0};
    if (::poll(&p, 1, 0) > 0) return RingEvent::error;
    if (std::chrono::steady_clock::now() >= deadline) return RingEvent::nothing;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

}  // namespace vhostkit::hostile
