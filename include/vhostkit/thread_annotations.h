// clang's thread-safety analysis (-Wthread-safety), as macros that vanish for g++, and the two
// capabilities vhostkit uses: a thread role and a mutex.
//
// A ThreadRole is not a lock: holding it means "this code runs as that thread" (the worker of a
// device, say), which is how Chromium and abseil model a thread's own state. State only the
// worker may touch is VHOSTKIT_GUARDED_BY(role); functions that run only on the worker are
// VHOSTKIT_REQUIRES(role). The worker's thread body enters the role; a callable the analysis
// cannot follow (a work item, a watched fd's handler) states it with assume(), and so does the
// control thread while the worker is parked or stopped.
#pragma once

#include <mutex>

#if defined(__clang__)
#define VHOSTKIT_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define VHOSTKIT_THREAD_ANNOTATION(x)
#endif

#define VHOSTKIT_CAPABILITY(x) VHOSTKIT_THREAD_ANNOTATION(capability(x))
#define VHOSTKIT_SCOPED_CAPABILITY VHOSTKIT_THREAD_ANNOTATION(scoped_lockable)
#define VHOSTKIT_GUARDED_BY(x) VHOSTKIT_THREAD_ANNOTATION(guarded_by(x))
#define VHOSTKIT_PT_GUARDED_BY(x) VHOSTKIT_THREAD_ANNOTATION(pt_guarded_by(x))
#define VHOSTKIT_REQUIRES(...) VHOSTKIT_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define VHOSTKIT_EXCLUDES(...) VHOSTKIT_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
#define VHOSTKIT_ACQUIRE(...) VHOSTKIT_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define VHOSTKIT_RELEASE(...) VHOSTKIT_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define VHOSTKIT_ASSERT_CAPABILITY(x) VHOSTKIT_THREAD_ANNOTATION(assert_capability(x))
#define VHOSTKIT_NO_THREAD_SAFETY_ANALYSIS VHOSTKIT_THREAD_ANNOTATION(no_thread_safety_analysis)

namespace vhostkit {

class VHOSTKIT_CAPABILITY("thread role") ThreadRole {
 public:
  // The analysis only: no code, no state.
  void enter() VHOSTKIT_ACQUIRE() {}
  void leave() VHOSTKIT_RELEASE() {}
  // The caller runs as the role's thread from here to the end of its scope.
  void assume() const VHOSTKIT_ASSERT_CAPABILITY(this) {}
};

// Plays a role for a scope (the worker's thread body; the control thread after the worker
// thread was joined).
class VHOSTKIT_SCOPED_CAPABILITY ScopedRole {
 public:
  explicit ScopedRole(ThreadRole& role) VHOSTKIT_ACQUIRE(role) : role_(role) { role_.enter(); }
  ~ScopedRole() VHOSTKIT_RELEASE() { role_.leave(); }
  ScopedRole(const ScopedRole&) = delete;
  ScopedRole& operator=(const ScopedRole&) = delete;

 private:
  ThreadRole& role_;
};

// std::mutex as a capability (libstdc++ does not annotate its own).
class VHOSTKIT_CAPABILITY("mutex") Mutex {
 public:
  void lock() VHOSTKIT_ACQUIRE() { mu_.lock(); }
  void unlock() VHOSTKIT_RELEASE() { mu_.unlock(); }

 private:
  std::mutex mu_;
};

class VHOSTKIT_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) VHOSTKIT_ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  ~MutexLock() VHOSTKIT_RELEASE() { mu_.unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

}  // namespace vhostkit
