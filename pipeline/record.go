package pipeline

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
)

// A journal record holds the readings of one submission (one device):
//
//	header:  crc32c uint32 LE | length uint32 LE      (8 bytes)
//	payload: uvarint n | string device | string kind | string district | varint received
//	         n × ( string metric | float64 bits LE | varint time )
//
// where string is uvarint length + bytes. The CRC (Castagnoli) covers the length
// field and the payload, so a torn write, a flipped bit or a zero-filled page
// (length 0 is never valid) is detected.
const (
	headerSize   = 8
	maxRecordLen = 16 << 20
	maxStringLen = 1 << 10
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// errCorrupt marks a record that fails its checks.
var errCorrupt = errors.New("corrupt journal record")

// appendRecord encodes rs (all of one device) as one record onto dst.
func appendRecord(dst []byte, rs []Reading) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, headerSize)...)
	first := rs[0]
	dst = binary.AppendUvarint(dst, uint64(len(rs)))
	dst = appendString(dst, first.Device)
	dst = appendString(dst, first.Kind)
	dst = appendString(dst, first.District)
	dst = binary.AppendVarint(dst, first.Received)
	for i := range rs {
		dst = appendString(dst, rs[i].Metric)
		dst = binary.LittleEndian.AppendUint64(dst, math.Float64bits(rs[i].Value))
		dst = binary.AppendVarint(dst, rs[i].Time)
	}
	n := len(dst) - start - headerSize
	binary.LittleEndian.PutUint32(dst[start+4:], uint32(n))
	crc := crc32.Update(0, castagnoli, dst[start+4:start+8])
	crc = crc32.Update(crc, castagnoli, dst[start+headerSize:])
	binary.LittleEndian.PutUint32(dst[start:], crc)
	return dst
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// recordLen returns the total length (header included) of the record at the
// start of b, after checking its header and CRC; it returns 0, nil if b holds
// less than one whole record.
func recordLen(b []byte) (int, error) {
	if len(b) < headerSize {
		return 0, nil
	}
	n := binary.LittleEndian.Uint32(b[4:])
	if n == 0 || n > maxRecordLen {
		return 0, fmt.Errorf("%w: length %d", errCorrupt, n)
	}
	if len(b) < headerSize+int(n) {
		return 0, nil
	}
	crc := crc32.Update(0, castagnoli, b[4:8])
	crc = crc32.Update(crc, castagnoli, b[headerSize:headerSize+int(n)])
	if crc != binary.LittleEndian.Uint32(b) {
		return 0, fmt.Errorf("%w: checksum mismatch", errCorrupt)
	}
	return headerSize + int(n), nil
}

// interner returns one string per distinct byte sequence, so that decoded
// readings of the same series share their strings. It is bounded.
type interner map[string]string

func (in interner) get(b []byte) string {
	if s, ok := in[string(b)]; ok { // no allocation for the lookup
		return s
	}
	if len(in) > 1<<16 {
		clear(in)
	}
	s := string(b)
	in[s] = s
	return s
}

// decodeRecord appends the readings of the record payload p to dst; seq is the
// record's journal position.
func decodeRecord(dst []Reading, p []byte, seq uint64, in interner) ([]Reading, error) {
	d := decoder{b: p}
	n := d.uvarint()
	dev, kind, district := d.str(in), d.str(in), d.str(in)
	recv := d.varint()
	if d.err == nil && n > uint64(len(p)) {
		d.err = fmt.Errorf("%w: %d readings in %d bytes", errCorrupt, n, len(p))
	}
	for i := uint64(0); i < n && d.err == nil; i++ {
		r := Reading{Device: dev, Kind: kind, District: district, Received: recv, Seq: seq}
		r.Metric = d.str(in)
		r.Value = math.Float64frombits(d.uint64())
		r.Time = d.varint()
		dst = append(dst, r)
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%w: %d trailing bytes", errCorrupt, len(d.b))
	}
	return dst, d.err
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: bad %s", errCorrupt, what)
	}
	d.b = nil
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("uvarint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail("varint")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uint64() uint64 {
	if len(d.b) < 8 {
		d.fail("float")
		return 0
	}
	v := binary.LittleEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

func (d *decoder) str(in interner) string {
	n := d.uvarint()
	if d.err != nil {
		return ""
	}
	if n > maxStringLen || n > uint64(len(d.b)) {
		d.fail("string length")
		return ""
	}
	s := in.get(d.b[:n])
	d.b = d.b[n:]
	return s
}
