package cluster

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/citypulse/citypulse/pipeline"
)

// The batch wire format (version 1), as published to the log:
//
//	version    byte (1)
//	nstrings   uvarint, then each string: uvarint length, bytes
//	nreadings  uvarint, then each reading:
//	           uvarint device, kind, district, metric (indexes into the strings)
//	           8 bytes value (IEEE 754, little endian)
//	           varint time (unix ns), varint received - time (ns)
//
// Strings repeat across a batch's readings and are sent once. Seq is not
// sent: the owner's pipeline assigns it when it journals the reading.
const batchVersion = 1

// Bounds a decoder enforces, whatever the payload says.
const (
	maxBatchReadings = 1 << 20
	maxBatchStrings  = 1 << 20
	maxStringLen     = 1 << 10
)

// ErrBadBatch wraps every decoding error.
var ErrBadBatch = errors.New("bad reading batch")

// AppendBatch appends the encoding of rs to dst.
func AppendBatch(dst []byte, rs []pipeline.Reading) []byte {
	index := make(map[string]uint64)
	var table []string
	intern := func(s string) {
		if _, ok := index[s]; !ok {
			index[s] = uint64(len(table))
			table = append(table, s)
		}
	}
	for i := range rs {
		intern(rs[i].Device)
		intern(rs[i].Kind)
		intern(rs[i].District)
		intern(rs[i].Metric)
	}
	dst = append(dst, batchVersion)
	dst = binary.AppendUvarint(dst, uint64(len(table)))
	for _, s := range table {
		dst = binary.AppendUvarint(dst, uint64(len(s)))
		dst = append(dst, s...)
	}
	dst = binary.AppendUvarint(dst, uint64(len(rs)))
	for i := range rs {
		r := &rs[i]
		dst = binary.AppendUvarint(dst, index[r.Device])
		dst = binary.AppendUvarint(dst, index[r.Kind])
		dst = binary.AppendUvarint(dst, index[r.District])
		dst = binary.AppendUvarint(dst, index[r.Metric])
		dst = binary.LittleEndian.AppendUint64(dst, math.Float64bits(r.Value))
		dst = binary.AppendVarint(dst, r.Time)
		dst = binary.AppendVarint(dst, r.Received-r.Time)
	}
	return dst
}

// batchReader reads a batch's fields, remembering the first error.
type batchReader struct {
	b   []byte
	err error
}

func (br *batchReader) fail(what string) {
	if br.err == nil {
		br.err = fmt.Errorf("%w: %s at byte %d", ErrBadBatch, what, len(br.b))
	}
}

func (br *batchReader) uvarint(what string) uint64 {
	v, n := binary.Uvarint(br.b)
	if n <= 0 {
		br.fail(what)
		return 0
	}
	br.b = br.b[n:]
	return v
}

func (br *batchReader) varint(what string) int64 {
	v, n := binary.Varint(br.b)
	if n <= 0 {
		br.fail(what)
		return 0
	}
	br.b = br.b[n:]
	return v
}

func (br *batchReader) str(table []string, what string) string {
	i := br.uvarint(what)
	if br.err != nil {
		return ""
	}
	if i >= uint64(len(table)) {
		br.fail(what + " index out of range")
		return ""
	}
	return table[i]
}

// DecodeBatch appends the readings encoded in b to dst. A payload that is
// not a version-1 batch, is truncated, has trailing bytes or exceeds the
// bounds returns an error wrapping ErrBadBatch (and dst unchanged).
func DecodeBatch(b []byte, dst []pipeline.Reading) ([]pipeline.Reading, error) {
	if len(b) == 0 || b[0] != batchVersion {
		return dst, fmt.Errorf("%w: not a version %d batch", ErrBadBatch, batchVersion)
	}
	br := &batchReader{b: b[1:]}
	ns := br.uvarint("string count")
	if ns > maxBatchStrings || ns > uint64(len(br.b)) {
		br.fail("string count too large")
	}
	var table []string
	for i := uint64(0); i < ns && br.err == nil; i++ {
		l := br.uvarint("string length")
		if l > maxStringLen || l > uint64(len(br.b)) {
			br.fail("string too long")
			break
		}
		table = append(table, string(br.b[:l]))
		br.b = br.b[l:]
	}
	nr := br.uvarint("reading count")
	// A reading takes at least 14 bytes: a payload cannot claim more.
	if nr > maxBatchReadings || nr > uint64(len(br.b))/14 {
		br.fail("reading count too large")
	}
	start := len(dst)
	for i := uint64(0); i < nr && br.err == nil; i++ {
		var r pipeline.Reading
		r.Device = br.str(table, "device")
		r.Kind = br.str(table, "kind")
		r.District = br.str(table, "district")
		r.Metric = br.str(table, "metric")
		if len(br.b) < 8 {
			br.fail("value")
			break
		}
		r.Value = math.Float64frombits(binary.LittleEndian.Uint64(br.b))
		br.b = br.b[8:]
		r.Time = br.varint("time")
		r.Received = r.Time + br.varint("received")
		dst = append(dst, r)
	}
	if br.err == nil && len(br.b) != 0 {
		br.fail("trailing bytes")
	}
	if br.err != nil {
		return dst[:start], br.err
	}
	return dst, nil
}
