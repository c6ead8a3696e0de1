// A scripted vhost-user back-end on one end of a socketpair, for the front-end's tests (the
// protocol side in vhost_user, the drivers in driver): it answers every request the way a
// correct back-end would, unless a hook says otherwise for that message (answer it itself,
// ignore it, or hang up), and records what it was sent.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "vhostkit/vhost_user/channel.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/protocol.h"

namespace vhostkit::testing {

// What a hook did with a message: nothing (answer it as usual), answered it itself (or chose
// not to), or closed the socket.
enum class Action { normal, handled, hang_up };

class FakeBackend {
 public:
  using Hook = std::function<Action(vhost_user::Channel&, const vhost_user::Header&,
                                    const vhost_user::FrontendMessage&)>;

  struct Script {
    std::uint64_t features = 0;           // GET_FEATURES
    std::uint64_t protocol_features = 0;  // GET_PROTOCOL_FEATURES
    std::uint64_t queue_num = 4;          // GET_QUEUE_NUM
    std::vector<std::uint8_t> config;     // config space; GET_CONFIG reads zeroes past its end
    std::uint32_t vring_base = 7;         // GET_VRING_BASE's answer for every ring
  };

  FakeBackend(vhost_user::Channel ch, Script script, Hook hook = {})
      : ch_(std::move(ch)), script_(std::move(script)), hook_(std::move(hook)) {
    (void)ch_.set_timeout(std::chrono::milliseconds(50));
    thread_ = std::thread([this] { loop(); });
  }
  ~FakeBackend() {
    done_ = true;
    thread_.join();
  }
  FakeBackend(const FakeBackend&) = delete;
  FakeBackend& operator=(const FakeBackend&) = delete;

  // Every request seen so far with its header flags (Request::none for request number 0).
  std::vector<std::pair<vhost_user::Request, std::uint32_t>> seen() {
    std::lock_guard lk(mu_);
    return seen_;
  }
  // The value of the last SET_FEATURES.
  std::uint64_t set_features() const { return set_features_.load(); }

 private:
  void loop() {
    while (!done_) {
      auto m = ch_.recv();
      if (!m) {
        if (m.error().code == vhostkit::Errc::would_block) continue;
        return;  // the front-end went away
      }
      const vhost_user::Header h = m->header;
      auto msg = vhost_user::decode(std::move(*m));
      ASSERT_TRUE(msg) << msg.error().message();
      {
        std::lock_guard lk(mu_);
        seen_.emplace_back(h.request == 0 ? vhost_user::Request::none : request_of(*msg), h.flags);
      }
      const Action a = hook_ ? hook_(ch_, h, *msg) : Action::normal;
      if (a == Action::hang_up) {
        (void)ch_.release();
        return;
      }
      if (a == Action::handled) continue;
      answer(h, *msg);
    }
  }

  void answer(const vhost_user::Header& h, const vhost_user::FrontendMessage& msg) {
    namespace vu = vhost_user;
    const vu::Request r = request_of(msg);
    switch (r) {
      case vu::Request::get_features: (void)ch_.send(vu::reply_u64(r, script_.features)); return;
      case vu::Request::get_protocol_features:
        (void)ch_.send(vu::reply_u64(r, script_.protocol_features));
        return;
      case vu::Request::get_queue_num: (void)ch_.send(vu::reply_u64(r, script_.queue_num)); return;
      case vu::Request::get_vring_base: {
        const auto& g = std::get<vu::GetVringBase>(msg);
        (void)ch_.send(vu::reply_vring_state(r, g.index, script_.vring_base));
        return;
      }
      case vu::Request::get_config: {
        const auto& g = std::get<vu::GetConfig>(msg);
        std::vector<std::uint8_t> cfg(g.size, 0);
        for (std::size_t i = 0; i < cfg.size() && g.offset + i < script_.config.size(); ++i) {
          cfg[i] = script_.config[g.offset + i];
        }
        (void)ch_.send(vu::reply_config(g.offset, g.flags, cfg));
        return;
      }
      case vu::Request::set_features: set_features_ = std::get<vu::SetFeatures>(msg).value; break;
      default: break;
    }
    if (h.need_reply()) (void)ch_.send(vu::reply_ack(r, true));
  }

  vhost_user::Channel ch_;
  const Script script_;
  Hook hook_;
  std::atomic<bool> done_{false};
  std::atomic<std::uint64_t> set_features_{0};
  std::mutex mu_;
  std::vector<std::pair<vhost_user::Request, std::uint32_t>> seen_;
  std::thread thread_;
};

// A hook that misbehaves on every `req` by running `bad` (which may count calls itself to
// misbehave on the nth only).
inline FakeBackend::Hook on(
    vhost_user::Request req,
    std::function<Action(vhost_user::Channel&, const vhost_user::Header&)> bad) {
  return [req, bad](vhost_user::Channel& ch, const vhost_user::Header& h,
                    const vhost_user::FrontendMessage&) {
    return h.request == static_cast<std::uint32_t>(req) ? bad(ch, h) : Action::normal;
  };
}

}  // namespace vhostkit::testing
