variable "name" {
  description = "Name prefix of every network resource (the cluster name)."
  type        = string
}

variable "cluster_name" {
  description = "EKS cluster that uses these subnets: the kubernetes.io/cluster/<name> tag lets its load balancers find them."
  type        = string
}

variable "cidr" {
  description = "IPv4 CIDR of the VPC, /16 to /20 (pods take VPC addresses with the VPC CNI, so leave room)."
  type        = string
  default     = "10.0.0.0/16"

  validation {
    condition     = can(cidrhost(var.cidr, 0)) && tonumber(split("/", var.cidr)[1]) >= 16 && tonumber(split("/", var.cidr)[1]) <= 20
    error_message = "cidr must be an IPv4 CIDR with a prefix length between /16 and /20."
  }
}

variable "az_count" {
  description = "How many availability zones to spread the subnets over (EKS needs at least 2)."
  type        = number
  default     = 3

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 4
    error_message = "az_count must be between 2 and 4."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all private subnets (cheaper) instead of one per zone (survives a zone outage)."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
