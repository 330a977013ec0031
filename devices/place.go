package devices

import (
	"fmt"
	"math"
)

// Location is where a device stands, in WGS 84 degrees.
type Location struct {
	Lat float64 `yaml:"lat" json:"lat"`
	Lon float64 `yaml:"lon" json:"lon"`
}

// validatePlace checks the optional group and location.
func (d Device) validatePlace() error {
	if d.Group != "" && !districtRE.MatchString(d.Group) {
		return fmt.Errorf("device %s: group %q must match [a-z0-9][a-z0-9_-]*", d.ID, d.Group)
	}
	if l := d.Location; l != nil {
		if math.IsNaN(l.Lat) || l.Lat < -90 || l.Lat > 90 || math.IsNaN(l.Lon) || l.Lon < -180 || l.Lon > 180 {
			return fmt.Errorf("device %s: location (%v, %v) is not a latitude in [-90, 90] and a longitude in [-180, 180]", d.ID, l.Lat, l.Lon)
		}
	}
	return nil
}
