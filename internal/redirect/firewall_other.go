//go:build !linux

package redirect

import "errors"

// errUnsupported is returned everywhere but Linux: nftables is a Linux
// facility. The stub exists so that packages importing redirect still build
// (and their other tests run) on a developer's non-Linux machine.
var errUnsupported = errors.New("nftables redirect is only supported on linux")

// Firewall programs the table inet agent_vault_proxy; on this platform every
// operation fails with an error.
type Firewall struct{}

// New always fails on this platform.
func New(port uint16) (*Firewall, error) {
	if port == 0 {
		return nil, errors.New("new nftables firewall: listener port must not be 0")
	}
	return nil, errUnsupported
}

// Install always fails on this platform.
func (f *Firewall) Install(uids []uint32) error { return errUnsupported }

// Enroll always fails on this platform.
func (f *Firewall) Enroll(uid uint32) error { return errUnsupported }

// Unenroll always fails on this platform.
func (f *Firewall) Unenroll(uid uint32) error { return errUnsupported }

// Enrolled always fails on this platform.
func (f *Firewall) Enrolled() ([]uint32, error) { return nil, errUnsupported }

// Healthy always fails on this platform.
func (f *Firewall) Healthy() (bool, error) { return false, errUnsupported }

// Remove always fails on this platform.
func (f *Firewall) Remove() error { return errUnsupported }

// Close does nothing on this platform.
func (f *Firewall) Close() error { return nil }
