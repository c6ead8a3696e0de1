// vhost::Device: the memory table (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) and the dirty log
// (SET_LOG_BASE), each a transaction against the running rings.
#include "device_impl.h"

namespace vhostkit::vhost {

using detail::ranges_overlap;

Result<> Device::set_mem_table(std::vector<memory::RegionFd> regions) {
  Impl& d = *impl_;
  if (auto r = d.need_owner("SET_MEM_TABLE"); !r) return r;
  // A transaction, as Linux's VHOST_SET_MEM_TABLE (this request's equivalent ioctl) is: the
  // whole new table is validated and mapped, and every ring checked against it, before anything
  // changes. A refused table leaves the old one mapped and every ring running on it; what this
  // attempt mapped is unmapped and its fds closed on the way out.
  memory::GuestMemory next;
  for (std::size_t i = 0; i < regions.size(); ++i) {
    if (auto r = next.add_region(regions[i].spec, std::move(regions[i].fd)); !r) {
      return fail(r.error().code, fmt::format("SET_MEM_TABLE region {}: {}", i, r.error().detail),
                  r.error().sys_errno);
    }
  }
  // Every configured ring is translated into the new table once, here. Running rings move to
  // it, and rings waiting only for memory start on it: both must lie inside it. A ring still
  // missing its kick or enable keeps its failed translation, reported when it starts.
  std::vector<Result<MappedRing>> mapped;
  mapped.reserve(d.queues.size());
  for (auto& q : d.queues) {
    if (q->num == 0 || !q->has_addr || next.region_count() == 0) {
      mapped.push_back(Queue::unmapped());
    } else {
      mapped.push_back(translate_ring(next, q->addr, q->num, q->index_, d.packed()));
    }
    const bool now = q->started();
    if ((now || d.startable(*q)) && !mapped.back()) {
      return fail(mapped.back().error().code,
                  fmt::format("SET_MEM_TABLE: the new table does not cover {} ring: {}",
                              now ? "a running" : "a ready", mapped.back().error().detail));
    }
  }
  d.with_workers_parked([&] {
    d.quiesce_running();
    std::swap(d.mem, next);
    d.install_log();
    next.set_dirty_log(nullptr);
    for (std::size_t i = 0; i < d.queues.size(); ++i) {
      Queue& q = *d.queues[i];
      q.worker_role_.assume();  // its worker is parked
      if (q.started()) d.reattach(q, *mapped[i]);
    }
  });
  for (std::size_t i = 0; i < d.queues.size(); ++i) d.queues[i]->mapped = std::move(mapped[i]);
  // `next` (the old table) is unmapped when it goes out of scope: no ring points into it now.
  // Every ready ring was checked against the table above, so a start can fail here only on a
  // system error (watching its kick fd); the table stays installed and that error is returned.
  return d.try_start_all();
}

Result<> Device::add_mem_region(memory::RegionFd region) {
  Impl& d = *impl_;
  if (auto r = d.need_owner("ADD_MEM_REG"); !r) return r;
  Result<> res;
  d.with_workers_parked([&] { res = d.mem.add_region(region.spec, std::move(region.fd)); });
  if (!res) {
    return fail(res.error().code, fmt::format("ADD_MEM_REG: {}", res.error().detail),
                res.error().sys_errno);
  }
  // A new region moves no mapped ring; it may hold one that did not translate before.
  for (auto& q : d.queues) {
    if (!q->mapped) d.map_ring(*q);
  }
  return d.try_start_all();
}

Result<> Device::remove_mem_region(const memory::RegionSpec& spec) {
  Impl& d = *impl_;
  if (auto r = d.need_owner("REM_MEM_REG"); !r) return r;
  for (auto& q : d.queues) {
    if (!q->started()) continue;
    const memory::VringAddr& a = q->addr;
    const RingPartBytes n = ring_part_bytes(q->num, d.packed());
    if (ranges_overlap(a.desc_user_addr, n.desc, spec.userspace_addr, spec.size) ||
        ranges_overlap(a.avail_user_addr, n.avail, spec.userspace_addr, spec.size) ||
        ranges_overlap(a.used_user_addr, n.used, spec.userspace_addr, spec.size)) {
      return fail(Errc::bad_state,
                  fmt::format("REM_MEM_REG: running vring {} lives in region uva 0x{:x}", q->index_,
                              spec.userspace_addr));
    }
  }
  Result<> res;
  d.with_workers_parked([&] {
    d.quiesce_running();
    res = d.mem.remove_region(spec);
  });
  if (!res) return res;
  // No running ring was in the region (refused above); a stopped one may have been.
  for (auto& q : d.queues) {
    if (!q->started()) d.map_ring(*q);
  }
  return res;
}

const memory::GuestMemory& Device::memory() const noexcept { return impl_->mem; }

Result<> Device::set_log_base(UniqueFd fd, std::uint64_t size, std::uint64_t offset) {
  Impl& d = *impl_;
  if (auto r = d.need_owner("SET_LOG_BASE"); !r) return r;
  auto log = std::make_unique<memory::DirtyLog>();
  if (auto r = log->attach(std::move(fd), size, offset); !r) return r;
  d.with_workers_parked([&] {
    std::swap(d.log, log);
    d.install_log();
  });
  return {};  // the previous log (if any) is unmapped here, after no worker can use it
}

}  // namespace vhostkit::vhost
