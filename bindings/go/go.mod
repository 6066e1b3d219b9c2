module dsd.dev/dsd

go 1.19
