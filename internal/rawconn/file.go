package rawconn

import (
	"os"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The audit journal's file calls, made with RawSyscall when the process has more than one
// P. A write or fdatasync of a regular file may block on the disk; made with Syscall, the
// call wakes the runtime's sysmon thread, which then polls every 20 µs for as long as it
// lasts and hands the P to another thread. For the journal's fdatasync (250-600 µs on
// this VM's disk) that was about 30 % of the journal's CPU at one connection. With
// RawSyscall the goroutine keeps its P while the disk works: the journal's other
// goroutines run on another P, and what they would read meanwhile waits in their sockets.
// With one P that would stall them behind every fdatasync, so Syscall is kept there.

// WriteFile writes all of b to f at off, or where f's offset is (its end, for a file
// opened with O_APPEND) when off is negative. It returns how much was written.
func WriteFile(f *os.File, b []byte, off int64) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	n := 0
	var e error
	err = rc.Write(func(fd uintptr) bool {
		for n < len(b) {
			k, errno := fileCall(fd, b[n:], off, n)
			if errno == unix.EINTR {
				continue
			}
			if errno != 0 {
				e = os.NewSyscallError("write", errno)
				break
			}
			if k == 0 {
				e = os.NewSyscallError("write", unix.EIO) // a regular file never takes nothing
				break
			}
			n += k
		}
		return true
	})
	if err == nil {
		err = e
	}
	return n, err
}

// fileCall makes one write (off < 0) or pwrite at off+done of p.
func fileCall(fd uintptr, p []byte, off int64, done int) (int, syscall.Errno) {
	var r uintptr
	var errno syscall.Errno
	buf, size := uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p))
	switch {
	case raceEnabled || runtime.GOMAXPROCS(0) == 1:
		var n int
		var err error
		if off < 0 {
			n, err = syscall.Write(int(fd), p)
		} else {
			n, err = syscall.Pwrite(int(fd), p, off+int64(done))
		}
		if err != nil {
			return 0, err.(syscall.Errno)
		}
		return n, 0
	case off < 0:
		r, _, errno = unix.RawSyscall(unix.SYS_WRITE, fd, buf, size)
	default:
		r, _, errno = unix.RawSyscall6(unix.SYS_PWRITE64, fd, buf, size, uintptr(off+int64(done)), 0, 0)
	}
	return int(r), errno
}

// Fdatasync flushes f's data, and the metadata needed to read it, to the disk.
func Fdatasync(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var e error
	err = rc.Control(func(fd uintptr) {
		for {
			var errno syscall.Errno
			if raceEnabled || runtime.GOMAXPROCS(0) == 1 {
				if err := syscall.Fdatasync(int(fd)); err != nil {
					errno = err.(syscall.Errno)
				}
			} else {
				_, _, errno = unix.RawSyscall(unix.SYS_FDATASYNC, fd, 0, 0)
			}
			if errno == unix.EINTR {
				continue
			}
			if errno != 0 {
				e = os.NewSyscallError("fdatasync", errno)
			}
			return
		}
	})
	if err == nil {
		err = e
	}
	return err
}
